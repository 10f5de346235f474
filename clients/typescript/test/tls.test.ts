// The TypeScript client's TLS option against `hivemesh serve` with TLS and
// mutual TLS on: throwaway certificates made for the test by the Python
// helper tests/fakes/tls.py (a CA, a server certificate for localhost,
// hivemesh.test and 127.0.0.1, a client certificate, and one from another CA,
// and the server's names under that other CA, as after a CA rotation).

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";

import {
  checkHealth,
  createClient,
  createMeshTransport,
  HivemeshError,
  type MeshTlsOptions,
  ServingStatus,
} from "@hivemesh/client";
import { ArtifactService } from "@hivemesh/client/artifact/v1";

import { FollowedTlsFiles } from "../src/tls-files.js";
import { PYTHON, REPO, type Service, startService } from "./services.js";

const MAKE_PKI = "import sys, pathlib; sys.path.insert(0, 'tests'); " +
  "from fakes.tls import make_pki; make_pki(pathlib.Path(sys.argv[1]))";

async function refused(call: Promise<unknown>): Promise<HivemeshError> {
  try {
    await call;
  } catch (err) {
    assert.ok(err instanceof HivemeshError, `expected a HivemeshError, got ${String(err)}`);
    return err;
  }
  assert.fail("the call succeeded");
}

/** `path` swapped at once for `contents`, as the kubelet swaps a Secret's files. */
function replaceFile(path: string, contents: Buffer): void {
  const staged = `${path}.new`;
  writeFileSync(staged, contents);
  renameSync(staged, path);
}

describe("TypeScript client over TLS", { timeout: 180_000 }, () => {
  const root = mkdtempSync(join(tmpdir(), "hivemesh-ts-tls-"));
  const pki = join(root, "pki");
  const pem = (name: string) => readFileSync(join(pki, name));
  let tls: Service;
  let mtls: Service;

  before(async () => {
    await promisify(execFile)(PYTHON, ["-c", MAKE_PKI, pki], { cwd: REPO });
    const server = {
      HIVEMESH_ARTIFACT_BACKEND: "memory",
      HIVEMESH_ARTIFACT_SERVER__TLS_CERT_FILE: join(pki, "server.crt"),
      HIVEMESH_ARTIFACT_SERVER__TLS_KEY_FILE: join(pki, "server.key"),
    };
    [tls, mtls] = await Promise.all([
      startService("artifact", join(root, "tls"), server),
      startService("artifact", join(root, "mtls"), {
        ...server,
        HIVEMESH_ARTIFACT_SERVER__TLS_CLIENT_CA_FILE: join(pki, "test-ca.pem"),
      }),
    ]);
  });

  after(async () => {
    await Promise.all([tls?.stop(), mtls?.stop()]);
    rmSync(root, { recursive: true, force: true });
  });

  /** A CA file in a directory of its own, holding the bundle of `cas`. */
  const liveCaFile = (name: string, ...cas: string[]) => {
    mkdirSync(join(root, name), { recursive: true });
    const caFile = join(root, name, "ca.crt");
    replaceFile(caFile, bundle(...cas));
    return caFile;
  };
  const bundle = (...cas: string[]) => Buffer.concat(cas.map(pem));

  const count = (address: string, options: MeshTlsOptions | boolean | undefined) =>
    createClient(ArtifactService, createMeshTransport(address, { tls: options })).countArtifacts(
      {},
      { timeoutMs: 5000 },
    );

  test("a client trusting the CA calls a TLS service and its health check", async () => {
    const options = { ca: pem("test-ca.pem") };
    assert.equal((await count(tls.address, options)).count, 0n);
    assert.equal(await checkHealth(createMeshTransport(tls.address, { tls: options })), ServingStatus.SERVING);
  });

  test("a plaintext client, or one trusting other CAs, is refused", async () => {
    await refused(count(tls.address, undefined));
    // Node's default CAs, or another CA: the client refuses the server.
    for (const options of [true, { ca: pem("other-ca.pem") }]) {
      assert.match((await refused(count(tls.address, options))).rawMessage, /unable to verify/);
    }
  });

  test("the server name can be overridden", async () => {
    const wrong = await refused(count(tls.address, { ca: pem("test-ca.pem"), serverName: "elsewhere.test" }));
    assert.match(wrong.rawMessage, /does not match certificate's altnames/);
    const named = { ca: pem("test-ca.pem"), serverName: "hivemesh.test" };
    assert.equal((await count(tls.address, named)).count, 0n);
  });

  test("mutual TLS refuses a client without a certificate signed by the CA", async () => {
    const ca = pem("test-ca.pem");
    await refused(count(mtls.address, { ca }));
    await refused(count(mtls.address, { ca, cert: pem("stranger.crt"), key: pem("stranger.key") }));
    const signed = { ca, cert: pem("client.crt"), key: pem("client.key") };
    assert.equal((await count(mtls.address, signed)).count, 0n);
    assert.equal(await checkHealth(createMeshTransport(mtls.address, { tls: signed })), ServingStatus.SERVING);
  });

  test("a certificate without its key is a usage error", () => {
    assert.throws(() => createMeshTransport(tls.address, { tls: { cert: pem("client.crt") } }), TypeError);
  });

  test("a path where PEM contents go is a usage error", () => {
    // Node would take it as a CA that signs nothing ("unable to verify the
    // first certificate", as if the server were the wrong one).
    const ca = join(pki, "test-ca.pem");
    assert.throws(() => createMeshTransport(tls.address, { tls: { ca } }), {
      name: "TypeError",
      message: /tls\.ca holds no PEM block: give the contents/,
    });
    const key = join(pki, "client.key");
    assert.throws(
      () => createMeshTransport(tls.address, { tls: { ca: pem("test-ca.pem"), cert: pem("client.crt"), key } }),
      { name: "TypeError", message: /tls\.key holds no PEM block/ },
    );
  });

  test("a client following its CA file reaches the service re-issued under a new CA", async () => {
    const caFile = liveCaFile("rotated-ca", "test-ca.pem");
    const issued = (name: string) => ({
      HIVEMESH_ARTIFACT_BACKEND: "memory",
      HIVEMESH_ARTIFACT_SERVER__TLS_CERT_FILE: join(pki, `${name}.crt`),
      HIVEMESH_ARTIFACT_SERVER__TLS_KEY_FILE: join(pki, `${name}.key`),
    });
    let server = await startService("artifact", join(root, "rotated"), issued("server"));
    try {
      const transport = createMeshTransport(server.address, { tls: { caFile, fileCheckIntervalMs: 0 } });
      const client = createClient(ArtifactService, transport);
      assert.equal((await client.countArtifacts({}, { timeoutMs: 5000 })).count, 0n);
      replaceFile(caFile, bundle("test-ca.pem", "other-ca.pem")); // the bundle gains the new CA
      const port = Number(server.address.split(":").pop());
      await server.stop(); // restarted on a certificate of the new CA
      server = await startService("artifact", join(root, "rotated"), issued("other-server"), port);
      assert.equal((await client.countArtifacts({}, { timeoutMs: 5000 })).count, 0n);
    } finally {
      await server.stop();
    }
  });

  test("a renewed client certificate is presented by the next connection", async () => {
    const live = join(root, "client-files");
    mkdirSync(live, { recursive: true });
    const [certFile, keyFile] = [join(live, "tls.crt"), join(live, "tls.key")];
    const install = (name: string) => {
      replaceFile(keyFile, pem(`${name}.key`));
      replaceFile(certFile, pem(`${name}.crt`));
    };
    install("stranger"); // a certificate of a CA the service does not trust
    const transport = createMeshTransport(mtls.address, {
      tls: { ca: pem("test-ca.pem"), certFile, keyFile, fileCheckIntervalMs: 0 },
    });
    const client = createClient(ArtifactService, transport);
    await refused(client.countArtifacts({}, { timeoutMs: 5000 }));
    install("client"); // renewed by the service's CA
    assert.equal((await client.countArtifacts({}, { timeoutMs: 5000 })).count, 0n);
  });

  test("a CA bundle cut short keeps the current secure context, warned about once", async () => {
    const caFile = liveCaFile("cut-ca", "test-ca.pem");
    const files = new FollowedTlsFiles({ caFile }, {}, { checkIntervalMs: 0 });
    const first = files.secureContext();
    const warnings: Error[] = [];
    const onWarning = (warning: Error & { code?: string }) => {
      if (warning.code === "HIVEMESH_TLS_FILES") warnings.push(warning);
    };
    process.on("warning", onWarning);
    try {
      replaceFile(caFile, Buffer.concat([pem("test-ca.pem"), pem("other-ca.pem").subarray(0, 200)]));
      for (let i = 0; i < 3; i++) assert.equal(files.secureContext(), first);
      await new Promise((done) => setImmediate(done)); // warnings are emitted on the next tick
      assert.equal(warnings.length, 1);
      assert.match(warnings[0].message, /malformed PEM certificate/);
      replaceFile(caFile, bundle("test-ca.pem", "other-ca.pem")); // written whole
      assert.notEqual(files.secureContext(), first);
    } finally {
      process.off("warning", onWarning);
    }
  });

  test("the TLS files are looked at once per interval", () => {
    const caFile = liveCaFile("interval-ca", "test-ca.pem");
    let now = 0;
    const files = new FollowedTlsFiles({ caFile }, {}, { checkIntervalMs: 10_000, now: () => now });
    const first = files.secureContext();
    replaceFile(caFile, bundle("test-ca.pem", "other-ca.pem"));
    now = 9_999;
    assert.equal(files.secureContext(), first);
    now = 10_000;
    const second = files.secureContext();
    assert.notEqual(second, first);
    now = 30_000;
    assert.equal(files.secureContext(), second); // nothing changed since
  });

  test("TLS files are checked when the transport is made", () => {
    assert.throws(() => createMeshTransport(tls.address, { tls: { caFile: join(pki, "client.key") } }), {
      message: /client\.key holds a malformed PEM certificate bundle/,
    });
    assert.throws(
      () => createMeshTransport(tls.address, { tls: { ca: pem("test-ca.pem"), caFile: join(pki, "test-ca.pem") } }),
      { name: "TypeError", message: /tls\.ca and tls\.caFile are the same: give one/ },
    );
    assert.throws(() => createMeshTransport(tls.address, { tls: { certFile: join(pki, "client.crt") } }), TypeError);
  });
});
