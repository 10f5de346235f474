// The TypeScript client against the running mesh: every service is a real
// `hivemesh serve` process on a loopback port chosen by the OS.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";

import {
  Code,
  checkHealth,
  createClient,
  createMeshTransport,
  HivemeshError,
  ServingStatus,
  untilEnd,
} from "@hivemesh/client";
import { ArtifactService } from "@hivemesh/client/artifact/v1";
import { StreamOutcome } from "@hivemesh/client/common/v1";
import { BudgetMode, InformationService } from "@hivemesh/client/information/v1";
import { LlmService, type StreamGenerateResponse } from "@hivemesh/client/llm/v1";
import { OrchestratorService } from "@hivemesh/client/orchestrator/v1";

import { Mesh, REPO } from "./services.js";

const CALL = { timeoutMs: 30_000 };

/** The HivemeshError a call fails with (the test fails if it succeeds). */
async function failure(call: Promise<unknown> | (() => Promise<unknown>)): Promise<HivemeshError> {
  try {
    await (typeof call === "function" ? call() : call);
  } catch (err) {
    assert.ok(err instanceof HivemeshError, `expected a HivemeshError, got ${String(err)}`);
    return err;
  }
  assert.fail("the call succeeded");
}

describe("TypeScript client against the running mesh", { timeout: 240_000 }, () => {
  const root = mkdtempSync(join(tmpdir(), "hivemesh-ts-"));
  let mesh: Mesh;

  before(async () => {
    mesh = await Mesh.start(root);
  });

  after(async () => {
    await mesh?.stop();
    rmSync(root, { recursive: true, force: true });
  });

  const artifacts = () => createClient(ArtifactService, createMeshTransport(mesh.address("artifact")));

  test("every service reports SERVING on the gRPC health check", async () => {
    for (const [name, service] of mesh.services) {
      assert.equal(await checkHealth(createMeshTransport(service.address)), ServingStatus.SERVING, name);
    }
    const transport = createMeshTransport(mesh.address("artifact"));
    assert.equal(await checkHealth(transport, "hivemesh.artifact.v1.ArtifactService"), ServingStatus.SERVING);
    const unknown = await failure(checkHealth(transport, "no.such.Service"));
    assert.equal(unknown.code, Code.NotFound);
    assert.equal(unknown.reason, ""); // the health service is gRPC's own, not a hivemesh API
  });

  test("artifact save, replayed save, get, list and count round trip", async () => {
    const client = artifacts();
    const workflowId = `wf-${randomUUID()}`;
    const request = {
      requestId: randomUUID(),
      workflowId,
      taskId: "code",
      agentId: "coder",
      artifactType: "code",
      content: "def add(a, b):\n    return a + b\n",
      metadata: { language: "python", lines: 2 },
    };
    const first = await client.saveArtifact(request, CALL);
    assert.equal(first.replayed, false);
    const saved = first.artifact!;
    assert.match(saved.artifactId, /^art-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    assert.equal(saved.sizeBytes, BigInt(Buffer.byteLength(request.content)));

    // The same request_id again: the first artifact, not a second one.
    const again = await client.saveArtifact(request, CALL);
    assert.equal(again.replayed, true);
    assert.equal(again.artifact!.artifactId, saved.artifactId);

    // The same request_id with a different artifact is refused.
    const conflict = await failure(client.saveArtifact({ ...request, content: "other" }, CALL));
    assert.equal(conflict.code, Code.AlreadyExists);
    assert.equal(conflict.reason, "IDEMPOTENCY_CONFLICT");
    assert.equal(conflict.errorMetadata.request_id, request.requestId);

    const { artifact: got } = await client.getArtifact({ artifactId: saved.artifactId }, CALL);
    assert.equal(got!.content, request.content);
    assert.deepEqual(got!.metadata, { language: "python", lines: 2 });
    assert.equal(got!.workflowId, workflowId);
    assert.equal(got!.sha256, saved.sha256);

    const second = await client.saveArtifact(
      { ...request, requestId: randomUUID(), artifactType: "test", content: "assert add(1, 2) == 3\n" },
      CALL,
    );
    const page1 = await client.listArtifacts({ filter: { workflowId }, pageSize: 1 }, CALL);
    assert.deepEqual(page1.artifacts.map((a) => a.artifactId), [second.artifact!.artifactId]); // newest first
    assert.notEqual(page1.nextPageToken, "");
    const page2 = await client.listArtifacts({ filter: { workflowId }, pageSize: 1, pageToken: page1.nextPageToken }, CALL);
    assert.deepEqual(page2.artifacts.map((a) => a.artifactId), [saved.artifactId]);
    assert.equal(page2.nextPageToken, "");
    const codeOnly = await client.listArtifacts({ filter: { workflowId, artifactType: "code" } }, CALL);
    assert.deepEqual(codeOnly.artifacts.map((a) => a.artifactId), [saved.artifactId]);
    assert.equal((await client.countArtifacts({ filter: { workflowId } }, CALL)).count, 2n);
  });

  test("an invalid request fails with INVALID_ARGUMENT and its field violations", async () => {
    const err = await failure(
      artifacts().saveArtifact(
        { requestId: randomUUID(), workflowId: "", agentId: "coder", artifactType: "Not Snake Case", content: "x" },
        CALL,
      ),
    );
    assert.equal(err.code, Code.InvalidArgument);
    assert.equal(err.reason, "INVALID_REQUEST");
    assert.equal(err.domain, "hivemesh.artifact");
    assert.deepEqual(err.fieldViolations.map((v) => v.field).sort(), ["artifact_type", "workflow_id"]);
    for (const violation of err.fieldViolations) {
      assert.notEqual(violation.description, "");
    }
    assert.equal(err.errorMetadata.violations, "2");
  });

  test("a missing artifact fails with NOT_FOUND and its ErrorInfo", async () => {
    const artifactId = `art-${randomUUID()}`;
    const err = await failure(artifacts().getArtifact({ artifactId }, CALL));
    assert.equal(err.code, Code.NotFound);
    assert.equal(err.reason, "NOT_FOUND");
    assert.equal(err.domain, "hivemesh.artifact");
    assert.deepEqual(err.errorMetadata, { resource_type: "artifact", resource_id: artifactId });
    assert.deepEqual(err.fieldViolations, []);
    assert.ok(err.rawMessage.includes(artifactId));
  });

  test("a refused reservation fails with BUDGET_EXCEEDED and names the budget it exceeds", async () => {
    const info = createClient(InformationService, createMeshTransport(mesh.address("information")));
    const tenantId = `ts-${randomUUID()}`;
    const { budget } = await info.createBudget(
      { requestId: randomUUID(), budget: { scope: { tenantId }, limitTokens: 100n, mode: BudgetMode.HARD } },
      CALL,
    );
    const err = await failure(
      info.reserve(
        { requestId: randomUUID(), context: { tenantId }, model: "mock-small", estimatedPromptTokens: 100n, maxTokens: 100n },
        CALL,
      ),
    );
    assert.equal(err.code, Code.ResourceExhausted);
    assert.equal(err.reason, "BUDGET_EXCEEDED");
    assert.equal(err.errorMetadata.budget_id, budget?.budgetId);
    assert.equal(err.quotaFailureViolations.length, 1);
    const [violation] = err.quotaFailureViolations;
    assert.equal(violation?.subject, `budget:${budget?.budgetId}`);
    assert.match(violation?.description ?? "", /limit 100\b.*requested 200/);
    assert.deepEqual(err.quotaViolations, [violation?.description]);
  });

  test("LLM StreamGenerate streams deltas and ends with a summary", async () => {
    const llm = createClient(LlmService, createMeshTransport(mesh.address("llm")));
    const messages: StreamGenerateResponse[] = [];
    for await (const message of llm.streamGenerate(
      {
        requestId: randomUUID(),
        model: "mock-small",
        input: { case: "prompt", value: { prompt: "Name three prime numbers in one sentence." } },
        config: { maxTokens: 64 },
      },
      CALL,
    )) {
      messages.push(message);
    }
    const last = messages.at(-1)!;
    assert.equal(last.event.case, "end");
    assert.equal(last.event.case === "end" && last.event.value.outcome, StreamOutcome.COMPLETED);
    const deltas = messages.slice(0, -1).map((m) => {
      assert.equal(m.event.case, "delta");
      return m.event.case === "delta" ? m.event.value.text : "";
    });
    assert.ok(deltas.length >= 2, `expected several deltas, got ${deltas.length}`);
    const summary = last.summary!;
    assert.equal(summary.model, "mock-small");
    assert.ok(summary.usage!.completionTokens > 0);
    assert.equal(summary.message!.content, deltas.join(""));
  });

  test("a stream that cannot start fails with a HivemeshError while iterating", async () => {
    const llm = createClient(LlmService, createMeshTransport(mesh.address("llm")));
    const err = await failure(async () => {
      for await (const _ of llm.streamGenerate(
        { requestId: randomUUID(), model: "no-such-model", input: { case: "prompt", value: { prompt: "hi" } } },
        CALL,
      )) {
        // no message is expected
      }
    });
    assert.equal(err.code, Code.NotFound);
    assert.equal(err.reason, "MODEL_NOT_FOUND");
    assert.equal(err.domain, "hivemesh.llm");
  });

  test("a deadline or a cancellation is a HivemeshError too, and untilEnd ends a stream", async () => {
    const llm = createClient(LlmService, createMeshTransport(mesh.address("llm")));
    const request = {
      requestId: randomUUID(),
      model: "mock-small",
      input: { case: "prompt" as const, value: { prompt: "Count to three." } },
    };
    const aborted = await failure(llm.generate(request, { signal: AbortSignal.abort() }));
    assert.equal(aborted.code, Code.Canceled);
    const late = await failure(async () => {
      for await (const _ of llm.streamGenerate(request, { timeoutMs: 1, signal: AbortSignal.timeout(1) })) {
        // may or may not get a message before the deadline
      }
    });
    assert.ok([Code.DeadlineExceeded, Code.Canceled].includes(late.code), `got ${late.code}`);
    const seen: string[] = [];
    for await (const message of untilEnd(llm.streamGenerate({ ...request, requestId: randomUUID() }, CALL))) {
      seen.push(message.event.case ?? "");
    }
    assert.equal(seen.at(-1), "end");
  });

  test("breaking out of a stream ends its call: a script that stops reading exits", async () => {
    // One alert stored for the watch to replay.
    const info = createClient(InformationService, createMeshTransport(mesh.address("information")));
    const tenantId = `ts-${randomUUID()}`;
    await info.createBudget(
      {
        requestId: randomUUID(),
        budget: { scope: { tenantId }, limitTokens: 100n, mode: BudgetMode.SOFT, alertThresholdsPercent: [50] },
      },
      CALL,
    );
    const { alerts } = await info.trackCompletion(
      { requestId: randomUUID(), context: { tenantId }, usage: { promptTokens: 60n }, model: "mock-small" },
      CALL,
    );
    assert.equal(alerts.length, 1);
    // Node exits once nothing is left open; with the call still streaming it
    // would not, and execFile would kill it at its timeout (a failure).
    for (const how of ["untilEnd", "stream"]) {
      const { stdout } = await promisify(execFile)(
        process.execPath,
        ["--import", "tsx", "test/scripts/stop-reading.ts", mesh.address("information"), how],
        { cwd: join(REPO, "clients", "typescript"), timeout: 60_000 },
      );
      assert.match(stdout, /^stopped reading at alert \S+$/m, how);
    }
  });

  test("RunAgent runs an agent through the whole mesh, and a retry replays it", async () => {
    const orchestrator = createClient(OrchestratorService, createMeshTransport(mesh.address("orchestrator")));
    const request = {
      requestId: randomUUID(),
      agent: "coder",
      input: "Implement a function that adds two integers.",
      variables: { project: "a calculator library" },
      context: { tenantId: "ts-client", workflowId: `wf-${randomUUID()}` },
    };
    const first = await orchestrator.runAgent(request, { timeoutMs: 120_000 });
    const result = first.result!;
    assert.equal(first.replayed, false);
    assert.equal(result.agent, "coder");
    assert.notEqual(result.output, "");
    assert.equal(result.model, "mock-small");
    assert.ok(result.usage!.totalTokens > 0);
    assert.match(result.traceId, /^[0-9a-f]{32}$/);
    assert.equal(result.artifactIds.length, 1);

    // The output was saved through the artifact service.
    const { artifact } = await artifacts().getArtifact({ artifactId: result.artifactIds[0] }, CALL);
    assert.equal(artifact!.content, result.output);
    assert.equal(artifact!.agentId, "coder");
    assert.equal(artifact!.artifactType, "code");

    const again = await orchestrator.runAgent(request, { timeoutMs: 120_000 });
    assert.equal(again.replayed, true);
    assert.deepEqual(again.result!.artifactIds, result.artifactIds);
    assert.equal(again.result!.output, result.output);
  });

  test("the README's example runs as written", async () => {
    const example = readFileSync(join(REPO, "clients", "typescript", "examples", "quickstart.ts"), "utf8");
    assert.ok(readFileSync(join(REPO, "README.md"), "utf8").includes(example.trim()), "README example differs");
    const { stdout } = await promisify(execFile)(
      process.execPath,
      ["--import", "tsx", "examples/quickstart.ts", mesh.address("artifact")],
      { cwd: join(REPO, "clients", "typescript"), timeout: 60_000 },
    );
    assert.match(stdout, /^saved art-[0-9a-f-]{36} \(11 bytes\); [1-9]\d* listed$/m);
    assert.match(stdout, /^not there: code 5, reason NOT_FOUND, domain hivemesh\.artifact$/m);
  });
});
