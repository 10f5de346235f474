"""LLM service benchmark, side by side with the LiteLLM proxy.

One fake OpenAI-compatible upstream (its own process, fixed answers, no
think time) is driven three ways in one run:
  direct   the openai SDK straight to the upstream (the baseline), as users
           call it: its default HTTP transport; also shown, not as the
           baseline, on the aiohttp transport the service itself uses
  litellm  the LiteLLM proxy (one worker) in front of the same upstream
  hivemesh this service (openai_compatible backend) through gRPC
For each: p50/p99 at concurrency 1 and 16, and the latency each ADDS over
direct; throughput at concurrency 16; and for streaming, the time to first
token each adds, next to a bare gRPC round trip (health check).

    python bench/llm_bench.py [--calls N] [--litellm PATH_TO_litellm]

LiteLLM is installed in its own environment (``make bench-llm`` does it:
``python -m venv .build/litellm-venv && .build/litellm-venv/bin/pip install
'litellm[proxy]'``); without it the LiteLLM column is skipped and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Result, run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ANSWER = "The answer is forty-two. " * 8
_COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench-model",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": ANSWER}}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 50, "total_tokens": 70}}).encode()


def _sse() -> bytes:
    chunks = []
    for word in ANSWER.split(" ")[:20]:
        chunks.append({"id": "c", "object": "chat.completion.chunk", "created": 0,
                       "model": "bench-model",
                       "choices": [{"index": 0, "delta": {"content": word + " "},
                                    "finish_reason": None}]})
    chunks.append({"id": "c", "object": "chat.completion.chunk", "created": 0,
                   "model": "bench-model",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({"id": "c", "object": "chat.completion.chunk", "created": 0,
                   "model": "bench-model", "choices": [],
                   "usage": {"prompt_tokens": 20, "completion_tokens": 20, "total_tokens": 40}})
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return body + b"data: [DONE]\n\n"


_STREAM = _sse()


async def _upstream(port_file: str) -> None:
    """A minimal keep-alive HTTP/1.1 server speaking the chat completions API."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if b'"stream": true' in body or b'"stream":true' in body:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"content-length: " + str(len(_STREAM)).encode() +
                                 b"\r\n\r\n" + _STREAM)
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: " + str(len(_COMPLETION)).encode() +
                                 b"\r\n\r\n" + _COMPLETION)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(port: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


async def _openai_client_bench(base_url: str, model: str, label: str, calls: int,
                               api_key: str = "sk-bench", aiohttp: bool = False) -> dict:
    from openai import AsyncOpenAI, DefaultAioHttpClient
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                         http_client=DefaultAioHttpClient() if aiohttp else None)
    messages = [{"role": "user", "content": "What is the answer?"}]

    async def once(_: int):
        return await client.chat.completions.create(model=model, messages=messages,
                                                    max_tokens=64)

    async def first_token(_: int):
        stream = await client.chat.completions.create(model=model, messages=messages,
                                                      max_tokens=64, stream=True)
        async for _chunk in stream:
            break
        await stream.close()

    out = {c: await run(f"{label}", once, concurrency=c, calls=calls * (4 if c > 1 else 1),
                        warmup=50) for c in (1, 16)}
    out["ttft"] = await run(f"{label} first token", first_token, concurrency=1, calls=calls,
                            warmup=20)
    await client.close()
    return out


async def _hivemesh_bench(address: str, calls: int) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hivemesh.client.channel import insecure_channel
    from hivemesh.llm.v1 import (
        GenerateRequest, GenerationConfig, LlmServiceStub, Prompt, StreamGenerateRequest)

    channel = insecure_channel(address, "llm")
    stub = LlmServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    prompt = Prompt(prompt="What is the answer?")
    config = GenerationConfig(max_tokens=64)

    async def once(_: int):
        return await stub.Generate(GenerateRequest(request_id=str(uuid.uuid4()), model="bench",
                                                   prompt=prompt, config=config), timeout=30)

    async def first_token(_: int):
        call = stub.StreamGenerate(StreamGenerateRequest(
            request_id=str(uuid.uuid4()), model="bench", prompt=prompt, config=config),
            timeout=30)
        await call.read()
        call.cancel()

    async def bare(_: int):
        return await health.Check(health_pb2.HealthCheckRequest(), timeout=10)

    async def bare_stream(_: int):
        # Health.Watch answers at once with the current status: the first
        # message of a server stream with no work behind it.
        call = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        await call.read()
        call.cancel()

    out = {c: await run("hivemesh", once, concurrency=c, calls=calls * (4 if c > 1 else 1),
                        warmup=50) for c in (1, 16)}
    out["ttft"] = await run("hivemesh first token", first_token, concurrency=1, calls=calls,
                            warmup=20)
    out["bare"] = await run("bare gRPC round trip", bare, concurrency=1, calls=calls, warmup=50)
    out["bare_stream"] = await run("bare gRPC stream, first message", bare_stream,
                                   concurrency=1, calls=calls, warmup=20)
    await channel.close()
    del grpc
    return out


def _added(line: Result, base: Result) -> str:
    return (f"{line.name:<22} c={line.concurrency:<3} p50={line.p50_us:7.0f}us "
            f"p99={line.p99_us:7.0f}us added p50={line.p50_us - base.p50_us:7.0f}us "
            f"added p99={line.p99_us - base.p99_us:7.0f}us throughput={line.throughput:6.0f}/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--litellm", default=str(ROOT / ".build/litellm-venv/bin/litellm"))
    parser.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        asyncio.run(_upstream(args.port_file))
        return 0

    from hivemesh.cli.processes import start_service

    tmp = Path(tempfile.mkdtemp(prefix="hivemesh-llm-bench-"))
    port_file = tmp / "upstream.port"
    procs: list[subprocess.Popen] = []
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", "--port-file",
                                 str(port_file)])
    procs.append(upstream)
    try:
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
        up = int(port_file.read_text())
        base_url = f"http://127.0.0.1:{up}/v1"
        config = {"backends": {"up": {"type": "openai_compatible", "base_url": base_url,
                                      "max_attempts": 1}},
                  "models": [{"alias": "bench", "backend": "up",
                              "upstream_model": "bench-model", "default": True}]}
        (tmp / "llm.json").write_text(json.dumps(config))
        service = start_service("llm", env={"HIVEMESH_LLM_CONFIG_FILE": str(tmp / "llm.json"),
                                            "HIVEMESH_LLM_SERVER__LOG_LEVEL": "WARNING"})
        litellm_port = None
        master_key = f"sk-{uuid.uuid4().hex}{uuid.uuid4().hex}"
        if Path(args.litellm).exists():
            litellm_port = _free_port()
            (tmp / "litellm.yaml").write_text(
                "model_list:\n  - model_name: bench\n    litellm_params:\n"
                f"      model: openai/bench-model\n      api_base: {base_url}\n"
                "      api_key: sk-bench\n")
            procs.append(subprocess.Popen(
                [args.litellm, "--config", str(tmp / "litellm.yaml"), "--port",
                 str(litellm_port), "--num_workers", "1"],
                stdout=subprocess.DEVNULL, stderr=open(tmp / "litellm.log", "wb"),  # noqa: SIM115
                env={**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": master_key}))
            _wait_http(litellm_port)
        try:
            direct = asyncio.run(_openai_client_bench(base_url, "bench-model", "direct",
                                                      args.calls))
            # Not the baseline: the SDK on the aiohttp transport the service
            # uses, to show what of the difference is the transport.
            direct_aio = asyncio.run(_openai_client_bench(base_url, "bench-model",
                                                          "direct (aiohttp)", args.calls,
                                                          aiohttp=True))
            ours = asyncio.run(_hivemesh_bench(service.address, args.calls))
            peer = (asyncio.run(_openai_client_bench(f"http://127.0.0.1:{litellm_port}",
                                                     "bench", "litellm", args.calls,
                                                     api_key=master_key))
                    if litellm_port else None)
        finally:
            service.stop()
        for c in (1, 16):
            print(_added(direct[c], direct[c]))
            print(_added(direct_aio[c], direct[c]))
            print(_added(ours[c], direct[c]))
            if peer:
                print(_added(peer[c], direct[c]))
        print("over the SDK on aiohttp (not the baseline): hivemesh adds "
              + ", ".join(f"{ours[c].p50_us - direct_aio[c].p50_us:.0f}us at c={c}"
                          for c in (1, 16))
              + f", {ours['ttft'].p50_us - direct_aio['ttft'].p50_us:.0f}us to the first token")
        print(f"streaming first token: direct p50 {direct['ttft'].p50_us:.0f}us; hivemesh "
              f"adds {ours['ttft'].p50_us - direct['ttft'].p50_us:.0f}us; bare gRPC round "
              f"trip {ours['bare'].p50_us:.0f}us" + (
                  f"; litellm adds {peer['ttft'].p50_us - direct['ttft'].p50_us:.0f}us"
                  if peer else ""))
        if peer:
            for c in (1, 16):
                ours_added = ours[c].p50_us - direct[c].p50_us
                peer_added = peer[c].p50_us - direct[c].p50_us
                print(f"target added p50 <= 1/10 of LiteLLM's at c={c}: hivemesh "
                      f"{ours_added:.0f}us vs litellm {peer_added:.0f}us "
                      f"(ratio {ours_added / peer_added:.2f})")
            print(f"target throughput >= 5x LiteLLM's (c=16): "
                  f"{ours[16].throughput / peer[16].throughput:.2f}x")
        else:
            print(f"LiteLLM not found at {args.litellm}: its columns are skipped")
        print(f"target first-token added <= one bare round trip: "
              f"{(ours['ttft'].p50_us - direct['ttft'].p50_us) / ours['bare'].p50_us:.2f} "
              "round trips (the first message of a bare gRPC stream, health Watch, takes "
              f"{ours['bare_stream'].p50_us / ours['bare'].p50_us:.2f} round trips)")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
