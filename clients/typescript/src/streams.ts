// Server streams that end their call when the caller stops reading.
//
// connect's clients hand back streams whose iterators have no `return()`: a
// loop that breaks out of one (or of `untilEnd(stream)`) leaves the call
// open, the server streaming into it and Node's event loop alive, until the
// caller's own signal aborts it. The client made here starts each stream
// with an AbortController of its own, which follows the caller's signal, and
// aborts it when the iteration stops before the stream's end.

import type { DescService } from "@bufbuild/protobuf";
import {
  type CallOptions,
  type Client,
  Code,
  ConnectError,
  createClient as createConnectClient,
  type Transport,
} from "@connectrpc/connect";

type StreamingFn = (input: unknown, options?: CallOptions) => AsyncIterable<unknown>;

/** A client of `service` through `transport` (connect's `createClient`),
 * whose server streams cancel their call when the iteration stops before
 * the end of the stream: a `break` or `return` out of a `for await` loop
 * over the stream or over `untilEnd(stream)`, or an exception thrown in its
 * body. The call's `signal`, if any, still aborts it too. */
export function createClient<T extends DescService>(service: T, transport: Transport): Client<T> {
  const client: Record<string, unknown> = { ...createConnectClient(service, transport) };
  for (const method of service.methods) {
    if (method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming") {
      const start = client[method.localName] as StreamingFn;
      client[method.localName] = (input: unknown, options?: CallOptions) =>
        endedWithIteration((signal) => start(input, { ...options, signal }), options?.signal);
    }
  }
  return client as Client<T>;
}

/** The stream `start` opens with a signal of its own, which follows
 * `callerSignal` and is aborted when the iteration stops before the end
 * (the iterator's `return()`, which `for await` calls on its way out). */
export function endedWithIteration<T>(
  start: (signal: AbortSignal) => AsyncIterable<T>,
  callerSignal?: AbortSignal,
): AsyncIterable<T> {
  const controller = new AbortController();
  const follow = () => controller.abort(callerSignal?.reason);
  if (callerSignal?.aborted) {
    follow();
  } else {
    callerSignal?.addEventListener("abort", follow, { once: true });
  }
  const messages = start(controller.signal)[Symbol.asyncIterator]();
  let over = false;
  // The stream's terminal message (`end`) has been read: a loop that stops
  // there leaves the call to finish (the server may still be wrapping up
  // its handler) instead of aborting it.
  let terminal = false;
  const finish = () => {
    over = true;
    callerSignal?.removeEventListener("abort", follow);
  };
  const iterator: AsyncIterator<T> = {
    async next() {
      if (over) {
        return { done: true, value: undefined };
      }
      try {
        const result = await messages.next();
        if (result.done) {
          finish();
        } else {
          terminal = isEnd(result.value);
        }
        return result;
      } catch (err) {
        finish();
        throw err;
      }
    },
    async return(value?: unknown) {
      if (!over) {
        finish();
        if (!terminal) {
          controller.abort(new ConnectError("the caller stopped reading the stream", Code.Canceled));
        }
        // Read what is left, the abort's error last, so that nothing of the
        // call is left pending (an unread rejection would be unhandled).
        void (async () => {
          try {
            while (!(await messages.next()).done) {
              // dropped: nobody reads them
            }
          } catch {
            // the abort, as expected (or the call's own end)
          }
        })();
      }
      return { done: true, value: value as T };
    },
  };
  return { [Symbol.asyncIterator]: () => iterator };
}

/** Whether `message` is a hivemesh stream's terminal message. */
function isEnd(message: unknown): boolean {
  const event = (message as { event?: { case?: unknown } } | null)?.event;
  return event?.case === "end";
}
