// TLS files that a transport takes again when they change (cert-manager
// renewing a mounted Secret, a trust bundle gaining a new CA and later
// losing the old): new connections get a secure context of the files as
// they are then, connections already open keep theirs.

import { X509Certificate } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import * as tls from "node:tls";

/** How often, at most, the files are looked at (when a connection opens). */
export const FILE_CHECK_INTERVAL_MS = 10_000;

/** Paths of PEM files: the CA bundle, the client's certificate and its key. */
export interface TlsFilePaths {
  readonly caFile?: string;
  readonly certFile?: string;
  readonly keyFile?: string;
}

/** PEM contents given as such, taken once. */
export interface TlsContents {
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
}

export interface FollowOptions {
  readonly checkIntervalMs?: number;
  /** The clock, in milliseconds (tests give their own). */
  readonly now?: () => number;
}

const CERTIFICATE_BLOCK = /-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----/g;

/** An Error unless `pem` is a bundle of certificates that all parse. Node
 * itself skips a malformed one without a word (a bundle cut short would
 * trust fewer CAs, or none). The message names the path, never the
 * contents. */
export function checkCaBundle(pem: Buffer, path: string): void {
  const text = pem.toString("latin1");
  const blocks = text.match(CERTIFICATE_BLOCK) ?? [];
  const begun = text.split("-----BEGIN ").length - 1;
  if (blocks.length === 0 || blocks.length !== begun) {
    throw new Error(`${path} holds a malformed PEM certificate bundle`);
  }
  for (const block of blocks) {
    try {
      new X509Certificate(block);
    } catch {
      throw new Error(`${path} holds a malformed PEM certificate`);
    }
  }
}

function read(path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new Error(`cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
}

/** A secure context of the files as they are now merged over `fixed`, once
 * they form a usable set (the CA bundle parses, the key is the
 * certificate's), else an Error. */
function readSecureContext(files: TlsFilePaths, fixed: TlsContents): tls.SecureContext {
  const options: tls.SecureContextOptions = { ...fixed };
  if (files.caFile !== undefined) {
    options.ca = read(files.caFile);
    checkCaBundle(options.ca, files.caFile);
  }
  if (files.certFile !== undefined) options.cert = read(files.certFile);
  if (files.keyFile !== undefined) options.key = read(files.keyFile);
  try {
    return tls.createSecureContext(options);
  } catch (err) {
    throw new Error(`the certificate and key do not form a usable pair: ${(err as Error).message}`);
  }
}

/** A file's stamp: its modification time, size and inode (a Kubernetes
 * Secret's files are swapped for new ones rather than written in place);
 * undefined while one of them is missing. */
function stamp(paths: readonly string[]): string | undefined {
  try {
    return paths
      .map((path) => {
        const s = statSync(path, { bigint: true });
        return `${s.mtimeNs}:${s.size}:${s.ino}`;
      })
      .join("|");
  } catch {
    return undefined;
  }
}

/** The secure context of TLS files, read again when they change. */
export class FollowedTlsFiles {
  private readonly paths: readonly string[];
  private readonly checkIntervalMs: number;
  private readonly now: () => number;
  private context: tls.SecureContext;
  private seen: string | undefined;
  private nextCheck: number;

  /** Reads the files now (an Error when they do not form a usable set). */
  constructor(
    private readonly files: TlsFilePaths,
    private readonly fixed: TlsContents = {},
    options: FollowOptions = {},
  ) {
    this.paths = [files.caFile, files.certFile, files.keyFile].filter((p) => p !== undefined);
    this.checkIntervalMs = options.checkIntervalMs ?? FILE_CHECK_INTERVAL_MS;
    this.now = options.now ?? Date.now;
    this.seen = stamp(this.paths);
    this.context = readSecureContext(files, fixed);
    this.nextCheck = this.now() + this.checkIntervalMs;
  }

  /** The context a new connection gets: of the files read again when their
   * stamps changed since the last look (at most every checkIntervalMs) and
   * they form a usable set; else the current one, a set that is not usable
   * warned about once per change. */
  secureContext(): tls.SecureContext {
    const now = this.now();
    if (now >= this.nextCheck) {
      this.nextCheck = now + this.checkIntervalMs;
      this.renew();
    }
    return this.context;
  }

  private renew(): void {
    const current = stamp(this.paths);
    if (current === undefined || current === this.seen) return;
    this.seen = current;
    try {
      this.context = readSecureContext(this.files, this.fixed);
    } catch (err) {
      const problem = (err as Error).message;
      process.emitWarning(
        `the TLS files changed but do not form a usable set; new connections keep the current ones (${problem})`,
        { code: "HIVEMESH_TLS_FILES" },
      );
    }
  }
}
