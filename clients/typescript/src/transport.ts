// A gRPC transport to one hivemesh service.

import type * as http2 from "node:http2";
import { isIP } from "node:net";
import * as tls from "node:tls";

import { Code, ConnectError, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { HivemeshError, hivemeshErrors, translated } from "./errors.js";
import { FollowedTlsFiles, type TlsContents } from "./tls-files.js";

export interface MeshTransportOptions {
  /** Interceptors run before the error translation (outermost first). */
  readonly interceptors?: readonly Interceptor[];
  /** Default deadline of every call in milliseconds; a call's own
   * `timeoutMs` wins. Unset: no default deadline. */
  readonly defaultTimeoutMs?: number;
  /** Largest message received, in bytes (the services allow 16 MiB). */
  readonly readMaxBytes?: number;
  /** Use TLS (`https`): `true` trusts Node's default CAs, an object sets
   * the CA, a client certificate (mutual TLS) and the server name. By
   * default plaintext HTTP/2, as on loopback or behind a sidecar. */
  readonly tls?: boolean | MeshTlsOptions;
}

/** TLS toward a hivemesh service whose settings turn it on
 * (`HIVEMESH_<SVC>_SERVER__TLS_*`). `ca`, `cert` and `key` are contents, PEM
 * text or bytes such as `readFileSync("ca.pem")`, taken once; `caFile`,
 * `certFile` and `keyFile` are paths instead, read again when they change
 * (looked at when a connection opens, at most every `fileCheckIntervalMs`):
 * new connections trust a renewed CA bundle and present a renewed
 * certificate, connections already open keep theirs. A set of files that is
 * not usable (a bundle cut short, a certificate written before its key) is
 * warned about once (`process.emitWarning`) and the current one kept. */
export interface MeshTlsOptions {
  /** CAs that may sign the server's certificate (default: Node's). */
  readonly ca?: string | Uint8Array;
  /** The client's certificate and its key (both or neither), for a
   * service that requires one (`..._SERVER__TLS_CLIENT_CA_FILE`). */
  readonly cert?: string | Uint8Array;
  readonly key?: string | Uint8Array;
  /** Paths of the same, PEM, each instead of its contents option. */
  readonly caFile?: string;
  readonly certFile?: string;
  readonly keyFile?: string;
  /** How often, at most, the files are looked at (default 10 s). */
  readonly fileCheckIntervalMs?: number;
  /** The name the server's certificate must carry when it is not the
   * address's host (an address by IP, a proxy). */
  readonly serverName?: string;
}

function secureOptions(options: MeshTlsOptions): http2.SecureClientSessionOptions {
  for (const name of ["ca", "cert", "key"] as const) {
    if (options[name] !== undefined && options[`${name}File`] !== undefined) {
      throw new TypeError(`tls.${name} and tls.${name}File are the same: give one`);
    }
  }
  if ((options.cert ?? options.certFile) === undefined !== ((options.key ?? options.keyFile) === undefined)) {
    throw new TypeError("tls.cert and tls.key go together: give both or neither");
  }
  const contents: TlsContents = {};
  if (options.ca !== undefined) contents.ca = toPem("ca", options.ca);
  if (options.cert !== undefined) contents.cert = toPem("cert", options.cert);
  if (options.key !== undefined) contents.key = toPem("key", options.key);
  if (options.caFile === undefined && options.certFile === undefined && options.keyFile === undefined) {
    return options.serverName === undefined ? contents : { ...contents, servername: options.serverName };
  }
  const files = new FollowedTlsFiles(options, contents, { checkIntervalMs: options.fileCheckIntervalMs });
  return { createConnection: (authority: URL) => connectTls(authority, files.secureContext(), options.serverName) };
}

/** A TLS connection for an HTTP/2 session to `authority`, as Node's own
 * (ALPN h2, the host as the server name unless it is an address). */
function connectTls(authority: URL, secureContext: tls.SecureContext, serverName: string | undefined): tls.TLSSocket {
  const host = authority.hostname.replace(/^\[(.*)\]$/, "$1");
  return tls.connect({
    host,
    port: Number(authority.port || 443),
    servername: serverName ?? (isIP(host) ? undefined : host),
    ALPNProtocols: ["h2"],
    secureContext,
  });
}

/** The option as Node takes it, PEM. A path given instead would be read by
 * Node as PEM holding nothing: a CA that signs no server ("unable to
 * verify the first certificate"), or a certificate or key it cannot
 * parse. The message names the option, never its contents. */
function toPem(name: string, value: string | Uint8Array): string | Buffer {
  const pem = typeof value === "string" ? value : Buffer.from(value);
  if (!pem.includes("-----BEGIN ")) {
    throw new TypeError(
      `tls.${name} holds no PEM block: give the contents (e.g. readFileSync(path)), not a path`,
    );
  }
  return pem;
}

/** A transport speaking gRPC over HTTP/2 to `host:port`. Failures of calls
 * through it are thrown as HivemeshError, deadlines and cancellations
 * included. */
export function createMeshTransport(address: string, options: MeshTransportOptions = {}): Transport {
  const tls = options.tls;
  return withHivemeshErrors(
    createGrpcTransport({
      baseUrl: `${tls ? "https" : "http"}://${address}`,
      nodeOptions: typeof tls === "object" ? secureOptions(tls) : undefined,
      interceptors: [...(options.interceptors ?? []), hivemeshErrors],
      defaultTimeoutMs: options.defaultTimeoutMs,
      readMaxBytes: options.readMaxBytes ?? 16 * 1024 * 1024,
    }),
  );
}

/** The transport with every failure thrown as a HivemeshError. The
 * interceptor alone is not enough: when a call's deadline passes or its
 * signal aborts, connect throws the signal's reason past the interceptors. */
export function withHivemeshErrors(transport: Transport): Transport {
  return {
    async unary(method, signal, timeoutMs, header, input, contextValues) {
      try {
        return await transport.unary(method, signal, timeoutMs, header, input, contextValues);
      } catch (err) {
        throw HivemeshError.from(err);
      }
    },
    async stream(method, signal, timeoutMs, header, input, contextValues) {
      let res;
      try {
        res = await transport.stream(method, signal, timeoutMs, header, input, contextValues);
      } catch (err) {
        throw HivemeshError.from(err);
      }
      return { ...res, message: cutIsUnavailable(translated(res.message), signal) };
    },
  };
}

/** The messages of a stream, a reset by the peer thrown as UNAVAILABLE:
 * connect reports an HTTP/2 stream the server reset (its process stopped,
 * its grace period ran out) as Canceled, though only an abort of the
 * caller's own signal cancels a call. */
async function* cutIsUnavailable<T>(messages: AsyncIterable<T>, signal: AbortSignal | undefined): AsyncGenerator<T> {
  try {
    yield* messages;
  } catch (err) {
    const error = HivemeshError.from(err);
    if (error.code !== Code.Canceled || signal?.aborted) {
      throw error;
    }
    throw HivemeshError.from(new ConnectError(error.rawMessage, Code.Unavailable, error.metadata, undefined, error));
  }
}
