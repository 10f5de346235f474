// HivemeshError decoding, without a server: the details a hivemesh service
// puts in its google.rpc.Status, as they arrive on a ConnectError or inside
// a FAILED StreamEnd.

import assert from "node:assert/strict";
import { test } from "node:test";

import { create, toBinary, type DescMessage, type MessageInitShape } from "@bufbuild/protobuf";
import { anyPack } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Transport } from "@connectrpc/connect";

import { createClient, HivemeshError, unpackDetail, untilEnd, withHivemeshErrors } from "@hivemesh/client";
import { InformationService, WatchAlertsResponseSchema } from "@hivemesh/client/information/v1";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  QuotaFailureSchema,
  RetryInfoSchema,
  StatusSchema,
} from "@hivemesh/client/rpc";

function detail<Desc extends DescMessage>(desc: Desc, init: MessageInitShape<Desc>) {
  return { type: desc.typeName, value: toBinary(desc, create(desc, init)) };
}

test("a ConnectError's details become reason, domain, metadata, violations and retry delay", () => {
  const wire = new ConnectError("budget exceeded", Code.ResourceExhausted);
  wire.details = [
    detail(ErrorInfoSchema, { reason: "BUDGET_EXCEEDED", domain: "hivemesh.information", metadata: { budget_id: "b-1" } }),
    detail(RetryInfoSchema, { retryDelay: { seconds: 2n, nanos: 500_000_000 } }),
    detail(QuotaFailureSchema, { violations: [{ subject: "budget:b-1", description: "limit 500 micros" }] }),
    detail(BadRequestSchema, { fieldViolations: [{ field: "max_tokens", description: "too many" }] }),
  ];
  const err = HivemeshError.from(wire);
  assert.ok(err instanceof HivemeshError);
  assert.ok(err instanceof ConnectError);
  assert.equal(err.code, Code.ResourceExhausted);
  assert.equal(err.rawMessage, "budget exceeded");
  assert.equal(err.reason, "BUDGET_EXCEEDED");
  assert.equal(err.domain, "hivemesh.information");
  assert.deepEqual(err.errorMetadata, { budget_id: "b-1" });
  assert.equal(err.retryDelayMs, 2500);
  assert.deepEqual(err.quotaFailureViolations, [{ subject: "budget:b-1", description: "limit 500 micros" }]);
  assert.deepEqual(err.quotaViolations, ["limit 500 micros"]);
  assert.deepEqual(err.fieldViolations, [{ field: "max_tokens", description: "too many", reason: "" }]);
  assert.equal(HivemeshError.from(err), err);
});

test("an error without details (not from a hivemesh service) has an empty reason", () => {
  const err = HivemeshError.from(new Error("connect ECONNREFUSED"), Code.Unavailable);
  assert.equal(err.code, Code.Unavailable);
  assert.equal(err.reason, "");
  assert.equal(err.domain, "");
  assert.deepEqual(err.errorMetadata, {});
  assert.equal(err.retryDelayMs, undefined);
  assert.ok(!(new ConnectError("plain") instanceof HivemeshError));
});

test("the Status of a FAILED StreamEnd becomes the same HivemeshError", () => {
  const status = create(StatusSchema, {
    code: Code.Unavailable,
    message: "stream interrupted after 3 chunks",
    details: [
      anyPack(ErrorInfoSchema, create(ErrorInfoSchema, {
        reason: "STREAM_INTERRUPTED", domain: "hivemesh.llm", metadata: { chunks: "3" },
      })),
    ],
  });
  const err = HivemeshError.fromStatus(status);
  assert.equal(err.code, Code.Unavailable);
  assert.equal(err.rawMessage, "stream interrupted after 3 chunks");
  assert.equal(err.reason, "STREAM_INTERRUPTED");
  assert.deepEqual(err.errorMetadata, { chunks: "3" });
  assert.equal(unpackDetail(status, ErrorInfoSchema)?.domain, "hivemesh.llm");
  assert.equal(unpackDetail(status, BadRequestSchema), undefined);
  assert.equal(HivemeshError.fromStatus(create(StatusSchema, { code: 99 })).code, Code.Unknown);
});

test("untilEnd: a COMPLETED end finishes, a FAILED one throws its status, a cut stream throws", async () => {
  const end = (outcome: number, error?: ReturnType<typeof create<typeof StatusSchema>>) => ({
    event: { case: "end" as const, value: { outcome, error } },
  });
  const delta = { event: { case: "delta" as const, value: { text: "hi" } } };
  async function* of<T>(...items: T[]) {
    yield* items;
  }
  const done = [];
  for await (const m of untilEnd(of<{ event: { case: string; value?: unknown } }>(delta, end(1)))) {
    done.push(m.event.case);
  }
  assert.deepEqual(done, ["delta", "end"]);
  const failed = create(StatusSchema, { code: Code.Unavailable, message: "stream interrupted" });
  await assert.rejects(
    (async () => {
      for await (const _ of untilEnd(of<{ event: { case: string; value?: unknown } }>(delta, end(2, failed)))) {
        // drain
      }
    })(),
    (err: unknown) => err instanceof HivemeshError && err.code === Code.Unavailable && err.rawMessage === "stream interrupted",
  );
  await assert.rejects(
    (async () => {
      for await (const _ of untilEnd(of<{ event: { case: string; value?: unknown } }>(delta))) {
        // drain
      }
    })(),
    (err: unknown) => err instanceof HivemeshError && err.code === Code.Unavailable,
  );
});

test("untilEnd: a FAILED end is thrown, not yielded, so a loop that stops at the end still fails", async () => {
  const failed = create(StatusSchema, { code: Code.Unavailable, message: "stream interrupted" });
  async function* stream() {
    yield { event: { case: "delta", value: { text: "hi" } } };
    yield { event: { case: "end", value: { outcome: 2, error: failed } } };
  }
  const seen: string[] = [];
  await assert.rejects(
    (async () => {
      for await (const m of untilEnd(stream())) {
        seen.push(m.event.case);
        if (m.event.case === "end") {
          break; // the terminal message: nothing follows it
        }
      }
    })(),
    (err: unknown) => err instanceof HivemeshError && err.rawMessage === "stream interrupted",
  );
  assert.deepEqual(seen, ["delta"]);
});

test("a stream cut by the peer is UNAVAILABLE, one the caller aborts stays CANCELED", async () => {
  // connect reports an HTTP/2 stream reset by the server (e.g. its process
  // died) as Canceled, though the caller cancelled nothing.
  const cut: Transport = {
    unary: () => Promise.reject(new Error("not used")),
    stream: async (method) => ({
      stream: true,
      service: method.parent,
      method,
      header: new Headers(),
      trailer: new Headers(),
      message: (async function* () {
        yield create(WatchAlertsResponseSchema, { event: { case: "heartbeat", value: {} } });
        throw new ConnectError("http/2 stream closed with error code CANCEL (0x8)", Code.Canceled);
      })(),
    }),
  } as Transport;
  const alerts = createClient(InformationService, withHivemeshErrors(cut));
  const drain = async (signal?: AbortSignal) => {
    for await (const _ of untilEnd(alerts.watchAlerts({}, { signal }))) {
      // heartbeats
    }
  };
  await assert.rejects(drain(), (err: unknown) => err instanceof HivemeshError && err.code === Code.Unavailable);
  const aborted = new AbortController();
  aborted.abort();
  await assert.rejects(drain(aborted.signal), (err: unknown) => err instanceof HivemeshError && err.code === Code.Canceled);
});
