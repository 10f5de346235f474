// The hivemesh TypeScript client. Messages and service descriptors of each
// API are generated (`@hivemesh/client/<api>/v1`); this module adds the
// transport, typed errors and the health check.

export { createClient } from "./streams.js";
export type { Client, Transport } from "@connectrpc/connect";
export { Code, HivemeshError, hivemeshErrors, unpackDetail, untilEnd } from "./errors.js";
export type { FieldViolation, QuotaViolation } from "./errors.js";
export { checkHealth, ServingStatus } from "./health.js";
export { createMeshTransport, withHivemeshErrors } from "./transport.js";
export type { MeshTlsOptions, MeshTransportOptions } from "./transport.js";
