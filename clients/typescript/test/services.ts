// Starts hivemesh services as child processes for the tests, the way
// `hivemesh up` does: `hivemesh serve <service> --host 127.0.0.1 --port 0`,
// whose first stdout line is `listening on HOST:PORT`. Every process started
// here is stopped by `stop()`, and killed if the test process exits first.

import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.HIVEMESH_PYTHON ?? join(REPO, ".venv", "bin", "python");
const START_TIMEOUT_MS = 90_000;
const STOP_TIMEOUT_MS = 15_000;

const live = new Set<ChildProcess>();
process.on("exit", () => {
  for (const child of live) {
    child.kill("SIGKILL");
  }
});

export class Service {
  constructor(
    readonly name: string,
    readonly address: string,
    readonly child: ChildProcess,
    readonly logPath: string,
  ) {}

  /** SIGTERM (graceful shutdown), then SIGKILL if it has not exited in time. */
  async stop(): Promise<void> {
    const child = this.child;
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise<void>((ok) => child.once("exit", () => ok()));
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
      await exited;
      clearTimeout(timer);
    }
    live.delete(child);
  }

  log(): string {
    return existsSync(this.logPath) ? readFileSync(this.logPath, "utf8") : "";
  }
}

/** `port` 0: one the OS picks; another: the port of a service restarted. */
export async function startService(
  name: string,
  dataDir: string,
  env: Record<string, string> = {},
  port = 0,
): Promise<Service> {
  if (!existsSync(PYTHON)) {
    throw new Error(`no Python at ${PYTHON}: run make install, or set HIVEMESH_PYTHON`);
  }
  mkdirSync(dataDir, { recursive: true });
  const logPath = join(dataDir, `${name}.log`);
  const log = openSync(logPath, "a");
  const child = spawn(
    PYTHON,
    ["-m", "hivemesh.cli.main", "serve", name, "--host", "127.0.0.1", "--port", String(port), "--data-dir", dataDir],
    { cwd: REPO, env: { ...process.env, ...env }, stdio: ["ignore", "pipe", log] },
  );
  closeSync(log);
  live.add(child);
  try {
    const line = await firstLine(child, START_TIMEOUT_MS);
    if (!line.startsWith("listening on ")) {
      throw new Error(`first output: ${JSON.stringify(line)}`);
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    child.stdout?.resume();
    return new Service(name, line.slice("listening on ".length).trim(), child, logPath);
  } catch (err) {
    child.kill("SIGKILL");
    live.delete(child);
    const tail = readFileSync(logPath, "utf8").split("\n").slice(-20).join("\n");
    throw new Error(`${name} did not start: ${(err as Error).message}\n${tail}`);
  }
}

function firstLine(child: ChildProcess, timeoutMs: number): Promise<string> {
  return new Promise((ok, fail) => {
    let buffered = "";
    const timer = setTimeout(() => done(new Error(`no address within ${timeoutMs} ms`)), timeoutMs);
    const onData = (chunk: Buffer) => {
      buffered += chunk.toString("utf8");
      const end = buffered.indexOf("\n");
      if (end >= 0) {
        done(undefined, buffered.slice(0, end));
      }
    };
    const onExit = (code: number | null, signal: string | null) =>
      done(new Error(`exited (code ${code}, signal ${signal})`));
    function done(err?: Error, line?: string) {
      clearTimeout(timer);
      child.stdout?.off("data", onData);
      child.off("exit", onExit);
      if (err) fail(err);
      else ok(line ?? "");
    }
    child.stdout?.on("data", onData);
    child.once("exit", onExit);
  });
}

export const PROVIDERS = ["artifact", "information", "llm", "memory"] as const;

/** The whole mesh, as `hivemesh up` runs it: the four providers with their
 * embedded defaults (SQLite, the keyless mock LLM, the embedded Qdrant
 * engine), then the orchestrator with the example agents. */
export class Mesh {
  readonly services = new Map<string, Service>();

  address(name: string): string {
    const service = this.services.get(name);
    if (!service) throw new Error(`${name} is not running`);
    return service.address;
  }

  static async start(root: string): Promise<Mesh> {
    const mesh = new Mesh();
    try {
      const started = await Promise.allSettled(
        PROVIDERS.map((name) => startService(name, join(root, name))),
      );
      for (const result of started) {
        if (result.status === "fulfilled") mesh.services.set(result.value.name, result.value);
      }
      const failed = started.find((r) => r.status === "rejected");
      if (failed) throw (failed as PromiseRejectedResult).reason;
      const env: Record<string, string> = {
        HIVEMESH_ORCHESTRATOR_AGENTS_DIR: join(REPO, "orchestrator", "examples", "agents"),
      };
      for (const name of PROVIDERS) {
        env[`HIVEMESH_ORCHESTRATOR_${name.toUpperCase()}_ADDRESS`] = mesh.address(name);
      }
      mesh.services.set("orchestrator", await startService("orchestrator", join(root, "orchestrator"), env));
      return mesh;
    } catch (err) {
      await mesh.stop();
      throw err;
    }
  }

  /** The orchestrator first, then the providers it calls. */
  async stop(): Promise<void> {
    await this.services.get("orchestrator")?.stop();
    await Promise.all([...this.services.values()].map((s) => s.stop()));
    this.services.clear();
  }
}
