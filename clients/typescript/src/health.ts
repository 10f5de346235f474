// The standard gRPC health check, served by every hivemesh service.

import type { Transport } from "@connectrpc/connect";
import { createClient } from "@connectrpc/connect";

import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc_health/v1/health_pb.js";

export { HealthCheckResponse_ServingStatus as ServingStatus };

/** The serving status of `service` (empty: the whole server), e.g.
 * `hivemesh.artifact.v1.ArtifactService`. */
export async function checkHealth(
  transport: Transport,
  service = "",
  timeoutMs = 5000,
): Promise<HealthCheckResponse_ServingStatus> {
  const response = await createClient(Health, transport).check({ service }, { timeoutMs });
  return response.status;
}
