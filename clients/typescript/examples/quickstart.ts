import { createClient, createMeshTransport, HivemeshError } from "@hivemesh/client";
import { ArtifactService } from "@hivemesh/client/artifact/v1";

const artifacts = createClient(ArtifactService, createMeshTransport(process.argv[2] ?? "127.0.0.1:7001"));
const { artifact } = await artifacts.saveArtifact({
  requestId: crypto.randomUUID(), workflowId: "wf-1", agentId: "coder",
  artifactType: "code", content: "print('hi')", metadata: { language: "python" },
});
const listed = await artifacts.listArtifacts({ filter: { workflowId: "wf-1", artifactType: "code" } });
console.log(`saved ${artifact?.artifactId} (${artifact?.sizeBytes} bytes); ${listed.artifacts.length} listed`);
try {
  await artifacts.getArtifact({ artifactId: "art-00000000-0000-0000-0000-000000000000" }, { timeoutMs: 5000 });
} catch (err) {
  if (!(err instanceof HivemeshError)) throw err;
  console.log(`not there: code ${err.code}, reason ${err.reason}, domain ${err.domain}`);
}
