// Typed errors for failed hivemesh calls.
//
// Every hivemesh service fails with a google.rpc.Status carrying exactly one
// google.rpc.ErrorInfo (reason, domain, metadata), plus BadRequest field
// violations for invalid requests and RetryInfo where a retry helps. The gRPC
// transport delivers those details on a ConnectError; HivemeshError reads
// them once, at the client boundary, and keeps the ConnectError's code,
// message and headers (it is a ConnectError itself).

import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";

import {
  BadRequestSchema,
  ErrorInfoSchema,
  QuotaFailureSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
import type { Status } from "./gen/google/rpc/status_pb.js";

/** One invalid field of a request (google.rpc.BadRequest.FieldViolation). */
export interface FieldViolation {
  /** Path of the field, e.g. `workflow_id` or `messages[0].content`. */
  readonly field: string;
  readonly description: string;
  /** The rule that failed, when the service names it. */
  readonly reason: string;
}

/** One violation of a google.rpc.QuotaFailure (RESOURCE_EXHAUSTED). */
export interface QuotaViolation {
  /** What ran out, e.g. `budget:<budget_id>` for a budget that cannot hold
   * a reservation. */
  readonly subject: string;
  readonly description: string;
}

/** A failed call, with the ErrorInfo and other details decoded. Its `name`
 * stays "ConnectError", so connect's own `instanceof ConnectError` checks
 * still recognise it. */
export class HivemeshError extends ConnectError {
  /** ErrorInfo.reason: `hivemesh.common.v1.ErrorReason` without its prefix,
   * e.g. `NOT_FOUND`, `INVALID_REQUEST`, `BUDGET_EXCEEDED`. Empty when the
   * error did not come from a hivemesh service (e.g. a connection failure). */
  readonly reason: string;
  /** ErrorInfo.domain: the service, e.g. `hivemesh.artifact`. */
  readonly domain: string;
  /** ErrorInfo.metadata: every dynamic value of the error. */
  readonly errorMetadata: Readonly<Record<string, string>>;
  /** BadRequest field violations (INVALID_ARGUMENT). */
  readonly fieldViolations: readonly FieldViolation[];
  /** RetryInfo.retry_delay in milliseconds, when the service asks for a pause. */
  readonly retryDelayMs: number | undefined;
  /** QuotaFailure violations, subject and description (RESOURCE_EXHAUSTED). */
  readonly quotaFailureViolations: readonly QuotaViolation[];
  /** The descriptions of `quotaFailureViolations`, in the same order. */
  readonly quotaViolations: readonly string[];

  private constructor(source: ConnectError) {
    super(source.rawMessage, source.code, source.metadata, undefined, source.cause);
    this.details = source.details;
    const info = first(this, ErrorInfoSchema);
    this.reason = info?.reason ?? "";
    this.domain = info?.domain ?? "";
    this.errorMetadata = Object.freeze({ ...(info?.metadata ?? {}) });
    this.fieldViolations = this.findDetails(BadRequestSchema).flatMap((bad) =>
      bad.fieldViolations.map((v) => ({ field: v.field, description: v.description, reason: v.reason })),
    );
    const delay = first(this, RetryInfoSchema)?.retryDelay;
    this.retryDelayMs =
      delay === undefined ? undefined : Number(delay.seconds) * 1000 + Math.round(delay.nanos / 1e6);
    this.quotaFailureViolations = this.findDetails(QuotaFailureSchema).flatMap((q) =>
      q.violations.map((v) => ({ subject: v.subject, description: v.description })),
    );
    this.quotaViolations = this.quotaFailureViolations.map((v) => v.description);
  }

  /** The HivemeshError for anything a call threw (an error from a transport
   * built by `createMeshTransport` already is one). */
  static override from(reason: unknown, code: Code = Code.Unknown): HivemeshError {
    if (reason instanceof HivemeshError) {
      return reason;
    }
    return new HivemeshError(ConnectError.from(reason, code));
  }

  /** The error a google.rpc.Status describes, such as the one a FAILED
   * `StreamEnd` carries at the end of a stream. */
  static fromStatus(status: Status): HivemeshError {
    const code = status.code in Code ? (status.code as Code) : Code.Unknown;
    const source = new ConnectError(status.message, code);
    source.details = status.details.map((any) => ({
      type: any.typeUrl.slice(any.typeUrl.lastIndexOf("/") + 1),
      value: any.value,
    }));
    return new HivemeshError(source);
  }

  // ConnectError answers `instanceof` for any ConnectError-shaped value; this
  // class answers only for its own instances.
  static override [Symbol.hasInstance](value: unknown): boolean {
    return typeof value === "object" && value !== null && HivemeshError.prototype.isPrototypeOf(value);
  }
}

function first<Desc extends DescMessage>(err: ConnectError, desc: Desc): MessageShape<Desc> | undefined {
  return err.findDetails(desc)[0];
}

/** Decodes one message of a google.rpc.Status's details (a google.protobuf.Any). */
export function unpackDetail<Desc extends DescMessage>(
  status: Status,
  desc: Desc,
): MessageShape<Desc> | undefined {
  for (const any of status.details) {
    const message = anyUnpack(any, desc);
    if (message !== undefined) {
      return message;
    }
  }
  return undefined;
}

/** An interceptor that turns every failure of a call, unary or streaming,
 * into a HivemeshError. `createMeshTransport` installs it. */
export const hivemeshErrors: Interceptor = (next) => async (req) => {
  let res;
  try {
    res = await next(req);
  } catch (err) {
    throw HivemeshError.from(err);
  }
  return res.stream ? { ...res, message: translated(res.message) } : res;
};

/** The messages of a stream, any failure while reading them thrown as a
 * HivemeshError. */
export async function* translated<T>(messages: AsyncIterable<T>): AsyncGenerator<T> {
  try {
    yield* messages;
  } catch (err) {
    throw HivemeshError.from(err);
  }
}

/** The terminal message of a hivemesh stream (`hivemesh.common.v1.StreamEnd`). */
interface StreamEndLike {
  readonly outcome: number;
  readonly error?: Status;
}

/** A message of a hivemesh server stream: its `event` oneof ends with `end`. */
interface StreamMessage {
  readonly event: { readonly case: string | undefined; readonly value?: unknown };
}

// hivemesh.common.v1.StreamOutcome.STREAM_OUTCOME_COMPLETED
const STREAM_OUTCOME_COMPLETED = 1;

/** Iterates a hivemesh server stream (StreamGenerate, StreamAgent,
 * SubscribeEvents, WatchAlerts) up to its terminal message and enforces the
 * stream contract: a COMPLETED `end` finishes the iteration (the terminal
 * message itself is yielded last, for what it carries, such as a summary), a
 * FAILED one throws the HivemeshError of its status instead of being yielded
 * (a loop that stops at the terminal message cannot take it for a success;
 * the error's metadata says what was delivered), and a stream that stops
 * without one throws UNAVAILABLE: it was cut. Leaving the loop before the
 * terminal message (`break`, `return`, a throw in its body) closes `stream`;
 * a stream of a client made by this package's `createClient` then aborts its
 * call, so the server stops streaming (one of connect's own `createClient`
 * cannot: abort the call's `signal` instead). Once the terminal message has
 * arrived, the call is left to finish on its own. */
export async function* untilEnd<M extends StreamMessage>(stream: AsyncIterable<M>): AsyncGenerator<M> {
  const messages = stream[Symbol.asyncIterator]();
  let ended = false;
  try {
    for (;;) {
      const next = await messages.next();
      if (next.done) {
        ended = true;
        break;
      }
      const message = next.value;
      if (message.event.case !== "end") {
        yield message;
        continue;
      }
      ended = true;
      // Past its terminal message the call is left to finish (the server
      // may still be wrapping up its handler), not aborted.
      void finish(messages);
      const end = message.event.value as StreamEndLike;
      if (end.outcome === STREAM_OUTCOME_COMPLETED) {
        yield message;
        return;
      }
      throw end.error !== undefined
        ? HivemeshError.fromStatus(end.error)
        : HivemeshError.from(new ConnectError("the stream ended FAILED without a status", Code.Unknown));
    }
  } finally {
    if (!ended) {
      // Left early: the stream is closed (which aborts its call, for a
      // stream of this package's createClient).
      await messages.return?.();
    }
  }
  throw HivemeshError.from(
    new ConnectError("the stream was cut before its terminal message", Code.Unavailable),
  );
}

/** Reads a stream past its terminal message to its close, so the call ends
 * on its own; a message after the terminal one closes it instead. */
async function finish<M>(messages: AsyncIterator<M>): Promise<void> {
  try {
    if (!(await messages.next()).done) {
      await messages.return?.();
    }
  } catch {
    // the call failed after its terminal message: nothing is waiting for it
  }
}

// Re-exported for callers that switch on codes.
export { Code };
