// Server streams of a client made by `createClient` of @hivemesh/client end
// their call when the caller stops reading, without a server: the signal
// each call was started with is what the transport sees.

import assert from "node:assert/strict";
import { test } from "node:test";
import { setImmediate as tick } from "node:timers/promises";

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type Transport } from "@connectrpc/connect";

import { createClient, HivemeshError, untilEnd, withHivemeshErrors } from "@hivemesh/client";
import { StreamOutcome } from "@hivemesh/client/common/v1";
import { InformationService, WatchAlertsResponseSchema } from "@hivemesh/client/information/v1";

const HEARTBEAT = create(WatchAlertsResponseSchema, { event: { case: "heartbeat", value: {} } });
const ALERT = create(WatchAlertsResponseSchema, { event: { case: "alert", value: { alertId: "a-1" } } });
const END = create(WatchAlertsResponseSchema, {
  event: { case: "end", value: { outcome: StreamOutcome.COMPLETED } },
});

/** A transport whose streams send `messages`, then, when `endless`, an
 * alert at every turn of the event loop until their signal aborts; the
 * signal of every call is kept in `signals`. */
function fakeTransport(messages: unknown[], endless: boolean) {
  const signals: AbortSignal[] = [];
  const transport = {
    unary: () => Promise.reject(new Error("not used")),
    stream: async (method: { parent: unknown }, signal: AbortSignal | undefined) => {
      assert.ok(signal, "every stream is started with a signal");
      signals.push(signal);
      return {
        stream: true,
        service: method.parent,
        method,
        header: new Headers(),
        trailer: new Headers(),
        message: (async function* () {
          yield* messages;
          while (endless) {
            if (signal.aborted) {
              throw new ConnectError("aborted", Code.Canceled);
            }
            yield ALERT;
            await tick();
          }
        })(),
      };
    },
  } as unknown as Transport;
  return { alerts: createClient(InformationService, withHivemeshErrors(transport)), signals };
}

test("breaking out of a stream, or of untilEnd(stream), aborts its call", async () => {
  const { alerts, signals } = fakeTransport([HEARTBEAT], true);
  for await (const message of untilEnd(alerts.watchAlerts({}))) {
    if (message.event.case === "alert") break;
  }
  for await (const message of alerts.watchAlerts({})) {
    if (message.event.case === "alert") break;
  }
  assert.equal(signals.length, 2);
  for (const signal of signals) {
    assert.ok(signal.aborted);
    assert.ok(signal.reason instanceof ConnectError && signal.reason.code === Code.Canceled);
  }
});

test("an exception thrown in the loop's body aborts the call too", async () => {
  const { alerts, signals } = fakeTransport([HEARTBEAT], true);
  await assert.rejects(
    (async () => {
      for await (const _ of untilEnd(alerts.watchAlerts({}))) {
        throw new Error("the caller's own failure");
      }
    })(),
    /the caller's own failure/,
  );
  assert.ok(signals[0].aborted);
});

test("a stream read to its end is not aborted", async () => {
  const { alerts, signals } = fakeTransport([HEARTBEAT, ALERT, END], false);
  const seen: string[] = [];
  for await (const message of alerts.watchAlerts({})) {
    seen.push(message.event.case ?? "");
  }
  assert.deepEqual(seen, ["heartbeat", "alert", "end"]);
  assert.equal(signals[0].aborted, false);
});

test("a plain loop that stops at the terminal message leaves the call to finish", async () => {
  // The server may still be wrapping up its handler after its last message.
  const { alerts, signals } = fakeTransport([HEARTBEAT, END], false);
  for await (const message of alerts.watchAlerts({})) {
    if (message.event.case === "end") break;
  }
  assert.equal(signals[0].aborted, false);
});

test("untilEnd leaves a call whose terminal message arrived to finish, not aborted", async () => {
  const failed = create(WatchAlertsResponseSchema, {
    event: { case: "end", value: { outcome: StreamOutcome.FAILED, error: { code: Code.Internal, message: "x" } } },
  });
  const { alerts, signals } = fakeTransport([HEARTBEAT, ALERT, END], false);
  for await (const message of untilEnd(alerts.watchAlerts({}))) {
    if (message.event.case === "end") break;
  }
  const { alerts: failing, signals: failingSignals } = fakeTransport([ALERT, failed], false);
  await assert.rejects(
    (async () => {
      for await (const _ of untilEnd(failing.watchAlerts({}))) {
        // up to the FAILED end, which is thrown
      }
    })(),
    (err: unknown) => err instanceof HivemeshError && err.code === Code.Internal,
  );
  assert.equal(signals[0].aborted, false);
  assert.equal(failingSignals[0].aborted, false);
});

test("the caller's signal still aborts the call, which fails with CANCELED", async () => {
  const { alerts, signals } = fakeTransport([HEARTBEAT], true);
  const caller = new AbortController();
  await assert.rejects(
    (async () => {
      for await (const message of untilEnd(alerts.watchAlerts({}, { signal: caller.signal }))) {
        if (message.event.case === "alert") caller.abort();
      }
    })(),
    (err: unknown) => err instanceof HivemeshError && err.code === Code.Canceled,
  );
  assert.ok(signals[0].aborted);
  const before = new AbortController();
  before.abort();
  await assert.rejects(
    (async () => {
      for await (const _ of alerts.watchAlerts({}, { signal: before.signal })) {
        // nothing: aborted before it started
      }
    })(),
    (err: unknown) => err instanceof HivemeshError && err.code === Code.Canceled,
  );
  assert.ok(signals[1].aborted);
});
