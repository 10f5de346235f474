"""Tools agents may call: built-ins backed by the providers (memory search,
artifact get and save) and remote tools served by any process that
implements ``hivemesh.orchestrator.v1.ToolService``, in any language.

A tool's own failure (bad arguments, nothing found, an error result a
remote tool declares) becomes a ToolError handed back to the model as it
is. A tool that could not answer at all (its server unreachable, failing
with a gRPC error or out of time; a built-in's provider failing) becomes a
ToolError with code UNAVAILABLE, and the run goes on without it, degraded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import protovalidate
from google.protobuf import json_format, struct_pb2

from hivemesh.artifact.v1 import GetArtifactRequest, SaveArtifactRequest
from hivemesh.client.channel import ChannelTls
from hivemesh.memory.v1 import SearchMemoriesRequest, SearchMode
from hivemesh.orchestrator.v1 import (
    ExecuteToolRequest, ListToolsRequest, ToolDefinition, ToolError)
from hivemesh.runtime import errors
from hivemesh.services.orchestrator.context import ExecutionContext
from hivemesh.services.orchestrator.policy import (
    TOOL_SERVICE, Providers, beyond_deadline, remaining_s)

log = logging.getLogger("hivemesh.orchestrator.tools")

# The most of a run's remaining time a remote tool call (or a listing of a
# server's tools) may take: a tool server that hangs degrades the run like
# one that is down, leaving it time to go on without the tool.
TOOL_SHARE = 0.5
# Pages of one server's ListTools: a server paging on and on (a token that
# never repeats) would hold every run waiting for the listing.
MAX_TOOL_PAGES = 100

_validator: protovalidate.Validator | None = None


def contract_violations(message) -> list[str]:
    """What in ``message`` breaks its contract's rules ("field: rule")."""
    global _validator
    if _validator is None:
        _validator = protovalidate.Validator()
    return [f"{v.proto.field.elements[0].field_name if v.proto.field.elements else ''}: "
            f"{v.proto.message or v.proto.rule_id}"
            for v in _validator.collect_violations(message)]


class ToolFailure(Exception):
    """Raised by a built-in tool for a failure the model should see."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.error = ToolError(code=code, message=message, retryable=retryable)


@dataclass
class ToolCall:
    name: str
    arguments: str
    tool_call_id: str
    request_id: str
    ctx: ExecutionContext
    memory_namespace: str = ""


Executor = Callable[[ToolCall], Awaitable[str]]


@dataclass
class ToolOutcome:
    """A tool call's result, or the error the model is given; ``failure``
    is set when the tool could not answer at all (the run is degraded)."""

    result: str = ""
    error: ToolError | None = None
    failure: errors.ServiceError | None = None


# Failures to answer after which calling again may succeed.
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})


def _schema(properties: dict, required: list[str]) -> struct_pb2.Struct:
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": properties, "required": required})
    return schema


def parse_arguments(arguments: str) -> Any:
    """The JSON value of a tool call's arguments (empty: ``{}``). ValueError
    also for JSON the parser cannot hold (nested too deep, an integer of too
    many digits) and for text no message can carry (a lone surrogate escape
    such as ``"\\ud800"``, which is no UTF-8): a model's output must never
    crash the run."""
    try:
        value = json.loads(arguments or "{}")
        # UnicodeEncodeError is a ValueError.
        json.dumps(value, ensure_ascii=False).encode()
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return value


def _arguments(call: ToolCall) -> dict:
    try:
        args = parse_arguments(call.arguments)
    except ValueError as exc:
        raise ToolFailure("INVALID_ARGUMENTS", f"arguments are not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise ToolFailure("INVALID_ARGUMENTS", "arguments must be a JSON object")
    return args


def _string(args: dict, key: str, *, required: bool = True) -> str:
    value = args.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise ToolFailure("INVALID_ARGUMENTS", f"{key!r} must be a non-empty string")
    return value


# A tool server that could not be listed is listed again, when a run or a
# registration needs a tool not known yet, at most this often.
RELIST_AFTER_S = 5.0


class ToolRegistry:
    def __init__(self, providers: Providers) -> None:
        self.providers = providers
        self._tools: dict[str, tuple[ToolDefinition, Executor]] = {}
        self._servers: dict[str, str] = {}
        self._unreachable: list[str] = []  # servers the last listing could not reach
        self._listed_at = float("-inf")  # time.monotonic() of the last listing's start
        self._listing: asyncio.Task | None = None  # the listing under way
        self._builtins()

    # ------------------------------------------------------------ registry

    def definitions(self, names) -> list[ToolDefinition]:
        return [self._tools[n][0] for n in names if n in self._tools]

    def known(self, name: str) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return sorted(self._tools)

    def register(self, definition: ToolDefinition, executor: Executor) -> None:
        """Add an in-process tool (embedding applications use this)."""
        self._tools[definition.name] = (definition, executor)

    def add_server(self, name: str, address: str, *, tls: ChannelTls | None = None) -> None:
        """A remote tool server; ``tls``: a TLS channel to it."""
        self._servers[name] = address
        self.providers.add(f"tool:{name}", address, TOOL_SERVICE, tls=tls)

    async def refresh(self) -> list[str]:
        """List the tools of every remote server; returns the servers that
        could not be reached (their tools stay as last listed). Callers that
        come while a listing runs share it. The listing runs under no run's
        deadline (each call within the call timeout), and a run waits for
        it at most ``TOOL_SHARE`` of its remaining time: past that, every
        server counts as unreachable to it, and the listing goes on."""
        if self._listing is None or self._listing.done():
            self._listed_at = time.monotonic()
            # Not the deadline of the run that happens to start it: a short
            # one would find a slow server unreachable for every run.
            with beyond_deadline():
                self._listing = asyncio.ensure_future(self._list_all())
        left = remaining_s()
        if left is None:
            return list(await asyncio.shield(self._listing))
        try:
            return list(await asyncio.wait_for(asyncio.shield(self._listing),
                                               max(left * TOOL_SHARE, 0.0)))
        except TimeoutError:
            return list(self._servers)

    async def _list_all(self) -> list[str]:
        unreachable = []
        for server in self._servers:
            try:
                await self._list(server)
            except errors.ServiceError as exc:
                log.warning("tool server %s unreachable: %s", server, exc.message)
                unreachable.append(server)
        self._unreachable = unreachable
        return unreachable

    async def find(self, names) -> list[str]:
        """The names that are no known tool. While some are unknown and a
        tool server could not be listed, the servers are listed again (at
        most every ``RELIST_AFTER_S``): one that was down at start-up
        brings its tools once it is up."""
        unknown = [n for n in names if n not in self._tools]
        if unknown and self._unreachable and \
                time.monotonic() - self._listed_at >= RELIST_AFTER_S:
            await self.refresh()
            unknown = [n for n in names if n not in self._tools]
        return unknown

    @property
    def unreachable(self) -> list[str]:
        """Tool servers the last listing could not reach."""
        return list(self._unreachable)

    async def _list(self, server: str) -> None:
        token = ""
        seen: set[str] = set()  # page tokens asked for
        for _ in range(MAX_TOOL_PAGES):
            page = await self.providers.call(f"tool:{server}", "ListTools",
                                             ListToolsRequest(page_token=token),
                                             share=TOOL_SHARE)
            for tool in page.tools:
                broken = contract_violations(tool)
                if broken:
                    # Offered to a model as it is, it would fail every
                    # generation of the runs allowed it (the LLM contract
                    # refuses it, as the caller's mistake).
                    log.warning("tool %r of server %s ignored: it breaks the tool contract "
                                "(%s)", tool.name, server, "; ".join(broken))
                    continue
                existing = self._tools.get(tool.name)
                owner = existing[1].server if existing is not None and isinstance(
                    existing[1], _RemoteExecutor) else None
                if existing is not None and owner != server:
                    log.warning("tool %s of server %s ignored: the name is taken",
                                tool.name, server)
                    continue
                self._tools[tool.name] = (tool, _RemoteExecutor(self.providers, server))
            token = page.next_page_token
            if not token:
                return
            if token in seen:
                # A server paging in a circle would hold the listing (which
                # every run and registration needing a tool waits for) forever.
                raise errors.ServiceError(
                    grpc.StatusCode.UNKNOWN, "UPSTREAM_ERROR",
                    f"tool:{server}: ListTools gave the page token {token!r} twice",
                    {"provider": f"tool:{server}"})
            seen.add(token)
        raise errors.ServiceError(
            grpc.StatusCode.UNKNOWN, "UPSTREAM_ERROR",
            f"tool:{server}: ListTools gave more than {MAX_TOOL_PAGES} pages",
            {"provider": f"tool:{server}"})

    async def execute(self, call: ToolCall) -> ToolOutcome:
        entry = self._tools.get(call.name)
        if entry is None:
            return ToolOutcome(error=ToolError(code="UNKNOWN_TOOL",
                                               message=f"no tool named {call.name!r}"))
        try:
            return ToolOutcome(result=await entry[1](call))
        except ToolFailure as failure:
            return ToolOutcome(error=failure.error)
        except errors.ServiceError as exc:
            return ToolOutcome(error=ToolError(code="UNAVAILABLE", message=exc.message,
                                               retryable=exc.code in _TRANSIENT), failure=exc)

    # ------------------------------------------------------------ built-ins

    def _builtins(self) -> None:
        self.register(ToolDefinition(
            name="memory_search",
            description="Search the agent's long-term memory for text relevant to a query.",
            parameters=_schema({"query": {"type": "string"},
                                "limit": {"type": "integer", "minimum": 1, "maximum": 20}},
                               ["query"])), self._memory_search)
        self.register(ToolDefinition(
            name="artifact_get", description="Read a stored artifact by its id.",
            parameters=_schema({"artifact_id": {"type": "string"}}, ["artifact_id"])),
            self._artifact_get)
        self.register(ToolDefinition(
            name="artifact_save",
            description="Save a piece of work (code, a test, a report) as an artifact.",
            parameters=_schema({"artifact_type": {"type": "string"},
                                "content": {"type": "string"}},
                               ["artifact_type", "content"])), self._artifact_save)

    async def _memory_search(self, call: ToolCall) -> str:
        args = _arguments(call)
        limit = args.get("limit", 5)
        # JSON true is no integer (bool is an int to Python; protobuf refuses it).
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 20:
            raise ToolFailure("INVALID_ARGUMENTS", "'limit' must be an integer from 1 to 20")
        try:
            found = await self.providers.call("memory", "SearchMemories", SearchMemoriesRequest(
                context=call.ctx.to_proto(), namespace=call.memory_namespace,
                query=_string(args, "query"), limit=limit, mode=SearchMode.SEARCH_MODE_HYBRID),
                share=TOOL_SHARE)
        except errors.ServiceError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ToolFailure("INVALID_ARGUMENTS", exc.message) from None
            raise
        return json.dumps([{"chunk_id": r.chunk.chunk_id, "text": r.chunk.text,
                            "score": round(r.score, 6), "source_id": r.chunk.source_id}
                           for r in found.results])

    async def _artifact_get(self, call: ToolCall) -> str:
        artifact_id = _string(_arguments(call), "artifact_id")
        try:
            found = await self.providers.call("artifact", "GetArtifact",
                                              GetArtifactRequest(artifact_id=artifact_id),
                                              share=TOOL_SHARE)
        except errors.ServiceError as exc:
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise ToolFailure("NOT_FOUND", f"no artifact {artifact_id!r}") from None
            raise
        a = found.artifact
        return json.dumps({"artifact_id": a.artifact_id, "artifact_type": a.artifact_type,
                           "content": a.content,
                           "metadata": json_format.MessageToDict(a.metadata)})

    async def _artifact_save(self, call: ToolCall) -> str:
        args = _arguments(call)
        artifact_type = _string(args, "artifact_type")
        content = _string(args, "content")
        try:
            saved = await self.providers.call("artifact", "SaveArtifact", SaveArtifactRequest(
                request_id=call.request_id, workflow_id=call.ctx.workflow_id or
                call.ctx.context_id, task_id=call.ctx.task_id, agent_id=call.ctx.agent,
                artifact_type=artifact_type, content=content), share=TOOL_SHARE)
        except errors.ServiceError as exc:
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ToolFailure("INVALID_ARGUMENTS", exc.message) from None
            raise
        return json.dumps({"artifact_id": saved.artifact.artifact_id,
                           "size_bytes": saved.artifact.size_bytes})


class _RemoteExecutor:
    def __init__(self, providers: Providers, server: str) -> None:
        self.providers = providers
        self.server = server

    async def __call__(self, call: ToolCall) -> str:
        response = await self.providers.call(
            f"tool:{self.server}", "ExecuteTool", ExecuteToolRequest(
                request_id=call.request_id, context=call.ctx.to_proto(), tool_name=call.name,
                arguments=call.arguments, tool_call_id=call.tool_call_id),
            span_attributes={"gen_ai.tool.name": call.name}, share=TOOL_SHARE)
        broken = contract_violations(response)
        if broken:
            # No outcome, or a result larger than the contract allows (which
            # the LLM service would refuse as the caller's mistake).
            raise ToolFailure("INVALID_RESPONSE",
                              f"tool server {self.server} answered outside the tool contract: "
                              + "; ".join(broken))
        if response.WhichOneof("outcome") == "error":
            raise ToolFailure(response.error.code or "TOOL_ERROR", response.error.message,
                              response.error.retryable)
        return response.result
