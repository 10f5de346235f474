"""``hivemesh up``: start every service built so far, each in its own
process, and run a demonstration through the mesh.

Today the mesh is the artifact store: the demonstration stores the three
work products of seed 004's coding -> test -> review workflow, lists them
back page by page, counts them and replays a retried save.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import uuid
from pathlib import Path

from hivemesh.cli.processes import Mesh, start_service

_WORK = [
    ("code", "coding-agent", "def add(a: int, b: int) -> int:\n    return a + b\n",
     {"language": "python"}),
    ("test", "test-agent", "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n",
     {"language": "python", "framework": "pytest"}),
    ("review", "review-agent", "LGTM: add() is typed and covered by a test.",
     {"verdict": "approve"}),
]


async def _demonstrate(address: str) -> None:
    from hivemesh.client import ArtifactClient

    workflow_id = f"wf-{uuid.uuid4().hex[:8]}"
    async with ArtifactClient(address) as artifacts:
        print(f"\nworkflow {workflow_id}: coding -> test -> review")
        first_request = None
        for step, (kind, agent, content, metadata) in enumerate(_WORK, 1):
            request_id = str(uuid.uuid4())
            first_request = first_request or (request_id, kind, agent, content, metadata)
            saved = await artifacts.save(workflow_id=workflow_id, task_id=f"task-{step}",
                                         agent_id=agent, artifact_type=kind, content=content,
                                         metadata=metadata, request_id=request_id)
            a = saved.artifact
            print(f"  saved {a.artifact_id}  {kind:<7} by {agent:<13} "
                  f"{a.size_bytes:>4} bytes  sha256 {a.sha256[:12]}")
        rid, kind, agent, content, metadata = first_request
        retry = await artifacts.save(workflow_id=workflow_id, task_id="task-1", agent_id=agent,
                                     artifact_type=kind, content=content, metadata=metadata,
                                     request_id=rid)
        print(f"  retried save of task-1 -> replayed={retry.replayed} "
              f"(same id {retry.artifact.artifact_id})")
        print("\nartifacts of the workflow, newest first (2 per page):")
        async for a in artifacts.iter(workflow_id=workflow_id, page_size=2):
            print(f"  {a.create_time.ToJsonString()}  {a.artifact_id}  {a.artifact_type}")
        total = await artifacts.count(workflow_id=workflow_id)
        reviews = await artifacts.count(workflow_id=workflow_id, artifact_type="review")
        print(f"\ncount: {total} artifacts, {reviews} review")
        code = (await artifacts.list(workflow_id=workflow_id, artifact_type="code")).artifacts[0]
        print(f"\n{code.artifact_id} ({code.artifact_type}):\n{code.content}")


def run_up(data_dir: str | None, keep_running: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="hivemesh-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp)
        mesh = Mesh()
        try:
            for service in ("artifact",):
                proc = start_service(service, data_dir=root / service,
                                     log_path=Path(tmp) / f"{service}.log")
                mesh.services[service] = proc
                print(f"{service:<9} listening on {proc.address} (pid {proc.process.pid})")
            asyncio.run(_demonstrate(mesh.services["artifact"].address))
            if keep_running:
                print("\nthe mesh keeps running; Ctrl-C stops it")
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            mesh.stop()
        print("\nall services stopped")
    return 0
