"""Typed async client of the memory service (semantic memory and
conversation history)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import timestamp_pb2

from hivemesh.client.base import DEFAULT, BaseClient, timestamp_of
from hivemesh.common.v1 import RequestContext
from hivemesh.memory.v1 import (
    AddMemoriesRequest, AddMemoriesResponse, AppendHistoryRequest, AppendHistoryResponse,
    ChunkIds, ChunkingOptions, Condition, CountMemoriesRequest, DeleteMemoriesRequest,
    Filter, ForgetNamespaceRequest, ForgetNamespaceResponse, GetHistoryRequest,
    GetHistoryResponse, GetMemoriesRequest, GetMemoriesResponse, HistoryMessage, Lineage,
    MemoryItem, MemoryServiceStub, MessageRole, NumericRange, SearchMemoriesRequest,
    SearchMemoriesResponse, SearchMode, StringList, TimeRange)

_MODES = {"dense": SearchMode.SEARCH_MODE_DENSE, "keyword": SearchMode.SEARCH_MODE_KEYWORD,
          "hybrid": SearchMode.SEARCH_MODE_HYBRID}
_ROLES = {"system": MessageRole.MESSAGE_ROLE_SYSTEM, "user": MessageRole.MESSAGE_ROLE_USER,
          "assistant": MessageRole.MESSAGE_ROLE_ASSISTANT, "tool": MessageRole.MESSAGE_ROLE_TOOL}

FilterLike = Filter | Sequence[Condition] | Mapping[str, Any] | None


# -- conditions ----------------------------------------------------------------
def equals(key: str, value: str | int | bool) -> Condition:
    """``key`` ("metadata.<path>", "source_id", "lineage.<field>") equals ``value``."""
    if isinstance(value, bool):
        return Condition(key=key, equals_bool=value)
    if isinstance(value, int):
        return Condition(key=key, equals_int=value)
    return Condition(key=key, equals_string=value)


def any_of(key: str, values: Sequence[str]) -> Condition:
    return Condition(key=key, any_of=StringList(values=list(values)))


def in_range(key: str, *, gte: float | None = None, gt: float | None = None,
             lte: float | None = None, lt: float | None = None) -> Condition:
    return Condition(key=key, range=NumericRange(gte=gte, gt=gt, lte=lte, lt=lt))


def _ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    return None if value is None else timestamp_of(value)


def in_time_range(key: str = "create_time", *, gte: dt.datetime | None = None,
                  gt: dt.datetime | None = None, lte: dt.datetime | None = None,
                  lt: dt.datetime | None = None) -> Condition:
    """For "create_time" and RFC 3339 metadata values; naive datetimes are UTC."""
    return Condition(key=key, time_range=TimeRange(gte=_ts(gte), gt=_ts(gt), lte=_ts(lte),
                                                   lt=_ts(lt)))


def to_filter(where: FilterLike) -> Filter | None:
    """A Filter from a Filter, a list of conditions, or a mapping of key to
    value (a list or tuple value means any of them)."""
    if where is None or isinstance(where, Filter):
        return where
    if isinstance(where, Mapping):
        return Filter(conditions=[any_of(k, v) if isinstance(v, list | tuple) else equals(k, v)
                                  for k, v in where.items()])
    return Filter(conditions=list(where))


def memory_item(content: str, *, source_id: str = "", metadata: Mapping[str, Any] | None = None,
                lineage: Lineage | Mapping[str, str] | None = None,
                replace_source: bool = False) -> MemoryItem:
    item = MemoryItem(content=content, source_id=source_id, replace_source=replace_source)
    if metadata:
        item.metadata.update(dict(metadata))
    if lineage:
        item.lineage.CopyFrom(lineage if isinstance(lineage, Lineage) else Lineage(**lineage))
    return item


def message(role: str | int, content: str, *, name: str = "", token_count: int = 0
            ) -> HistoryMessage:
    """A history message; ``role`` is "system", "user", "assistant", "tool"
    or a MessageRole value."""
    return HistoryMessage(role=_ROLES[role] if isinstance(role, str) else role,
                          content=content, name=name, token_count=token_count)


def _rid(request_id: str | None) -> str:
    return request_id or str(uuid.uuid4())


class MemoryClient(BaseClient):
    """``async with MemoryClient("127.0.0.1:7004") as memory: ...``

    Every call takes ``namespace`` (empty: the service derives it from
    ``context.tenant_id``, else "default") and ``context``. Mutating calls
    take ``request_id`` (a fresh UUID when omitted), so a retried call
    happens once.
    """

    api = "memory"

    def __init__(self, target: str | None = None, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._stub = MemoryServiceStub(self.channel)

    async def add(self, items: Sequence[MemoryItem | str], *, namespace: str = "",
                  context: RequestContext | None = None, chunk_size_chars: int = 0,
                  chunk_overlap_chars: int = 0, no_overlap: bool = False,
                  whole_item: bool = False, request_id: str | None = None,
                  timeout=DEFAULT) -> AddMemoriesResponse:
        """Stores items (plain strings or :func:`memory_item` results)."""
        request = AddMemoriesRequest(
            request_id=_rid(request_id), context=context, namespace=namespace,
            items=[memory_item(i) if isinstance(i, str) else i for i in items],
            chunking=ChunkingOptions(chunk_size_chars=chunk_size_chars,
                                     chunk_overlap_chars=chunk_overlap_chars,
                                     no_overlap=no_overlap, whole_item=whole_item))
        return await self._unary(self._stub.AddMemories, request, timeout)

    async def add_text(self, content: str, *, source_id: str = "",
                       metadata: Mapping[str, Any] | None = None,
                       lineage: Lineage | Mapping[str, str] | None = None,
                       replace_source: bool = False, **kwargs: Any) -> AddMemoriesResponse:
        """One item; other keyword arguments as for :meth:`add`."""
        return await self.add([memory_item(content, source_id=source_id, metadata=metadata,
                                           lineage=lineage, replace_source=replace_source)],
                              **kwargs)

    async def search(self, query: str, *, mode: str | int = "dense", limit: int = 10,
                     score_threshold: float | None = None, where: FilterLike = None,
                     namespace: str = "", context: RequestContext | None = None,
                     timeout=DEFAULT) -> SearchMemoriesResponse:
        """``mode``: "dense", "keyword", "hybrid" or a SearchMode value."""
        request = SearchMemoriesRequest(
            context=context, namespace=namespace, query=query, limit=limit,
            mode=_MODES[mode] if isinstance(mode, str) else mode,
            score_threshold=score_threshold, filter=to_filter(where))
        return await self._unary(self._stub.SearchMemories, request, timeout)

    async def get(self, chunk_ids: Sequence[str], *, namespace: str = "",
                  context: RequestContext | None = None, timeout=DEFAULT) -> GetMemoriesResponse:
        request = GetMemoriesRequest(context=context, namespace=namespace,
                                     chunk_ids=list(chunk_ids))
        return await self._unary(self._stub.GetMemories, request, timeout)

    async def delete(self, chunk_ids: Sequence[str] | None = None, *, where: FilterLike = None,
                     namespace: str = "", context: RequestContext | None = None,
                     request_id: str | None = None, timeout=DEFAULT) -> int:
        """Deletes by ids or by filter (exactly one); returns how many."""
        if (chunk_ids is None) == (where is None):
            raise ValueError("pass exactly one of chunk_ids or where")
        request = DeleteMemoriesRequest(request_id=_rid(request_id), context=context,
                                        namespace=namespace)
        if chunk_ids is not None:
            request.ids.CopyFrom(ChunkIds(chunk_ids=list(chunk_ids)))
        else:
            request.filter.CopyFrom(to_filter(where))
        return (await self._unary(self._stub.DeleteMemories, request, timeout)).deleted_count

    async def count(self, *, where: FilterLike = None, namespace: str = "",
                    context: RequestContext | None = None, timeout=DEFAULT) -> int:
        request = CountMemoriesRequest(context=context, namespace=namespace,
                                       filter=to_filter(where))
        return (await self._unary(self._stub.CountMemories, request, timeout)).count

    async def forget(self, namespace: str, *, context: RequestContext | None = None,
                     request_id: str | None = None, timeout=DEFAULT) -> ForgetNamespaceResponse:
        """Deletes every memory and session history of ``namespace``."""
        request = ForgetNamespaceRequest(request_id=_rid(request_id), context=context,
                                         namespace=namespace)
        return await self._unary(self._stub.ForgetNamespace, request, timeout)

    async def append_history(self, session_id: str,
                             messages: Sequence[HistoryMessage | tuple[str, str]], *,
                             namespace: str = "", context: RequestContext | None = None,
                             request_id: str | None = None,
                             timeout=DEFAULT) -> AppendHistoryResponse:
        """Appends messages (HistoryMessage or (role, content) pairs), oldest first."""
        request = AppendHistoryRequest(
            request_id=_rid(request_id), context=context, namespace=namespace,
            session_id=session_id,
            messages=[m if isinstance(m, HistoryMessage) else message(*m) for m in messages])
        return await self._unary(self._stub.AppendHistory, request, timeout)

    async def get_history(self, session_id: str, *, token_budget: int = 0,
                          max_messages: int = 0, namespace: str = "",
                          context: RequestContext | None = None,
                          timeout=DEFAULT) -> GetHistoryResponse:
        """The newest messages that fit ``token_budget`` (0: no limit), oldest first."""
        request = GetHistoryRequest(context=context, namespace=namespace, session_id=session_id,
                                    token_budget=token_budget, max_messages=max_messages)
        return await self._unary(self._stub.GetHistory, request, timeout)
