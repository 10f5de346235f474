import datetime

from buf.validate import validate_pb2 as _validate_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from hivemesh.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BudgetEnforcement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_ENFORCEMENT_UNSPECIFIED: _ClassVar[BudgetEnforcement]
    BUDGET_ENFORCEMENT_RESERVE: _ClassVar[BudgetEnforcement]
    BUDGET_ENFORCEMENT_TRACK: _ClassVar[BudgetEnforcement]
    BUDGET_ENFORCEMENT_DISABLED: _ClassVar[BudgetEnforcement]

class DegradedComponent(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEGRADED_COMPONENT_UNSPECIFIED: _ClassVar[DegradedComponent]
    DEGRADED_COMPONENT_MEMORY_RECALL: _ClassVar[DegradedComponent]
    DEGRADED_COMPONENT_MEMORY_WRITE_BACK: _ClassVar[DegradedComponent]
    DEGRADED_COMPONENT_HISTORY: _ClassVar[DegradedComponent]
    DEGRADED_COMPONENT_BUDGET: _ClassVar[DegradedComponent]
    DEGRADED_COMPONENT_ARTIFACT: _ClassVar[DegradedComponent]
    DEGRADED_COMPONENT_TOOL: _ClassVar[DegradedComponent]
    DEGRADED_COMPONENT_MODEL_FALLBACK: _ClassVar[DegradedComponent]

class CombineMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMBINE_MODE_UNSPECIFIED: _ClassVar[CombineMode]
    COMBINE_MODE_FIRST: _ClassVar[CombineMode]
    COMBINE_MODE_ALL: _ClassVar[CombineMode]
    COMBINE_MODE_JUDGE: _ClassVar[CombineMode]

class TaskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATUS_UNSPECIFIED: _ClassVar[TaskStatus]
    TASK_STATUS_PENDING: _ClassVar[TaskStatus]
    TASK_STATUS_RUNNING: _ClassVar[TaskStatus]
    TASK_STATUS_SUCCEEDED: _ClassVar[TaskStatus]
    TASK_STATUS_FAILED: _ClassVar[TaskStatus]
    TASK_STATUS_SKIPPED: _ClassVar[TaskStatus]
    TASK_STATUS_CANCELLED: _ClassVar[TaskStatus]

class WorkflowStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKFLOW_STATUS_UNSPECIFIED: _ClassVar[WorkflowStatus]
    WORKFLOW_STATUS_SUCCEEDED: _ClassVar[WorkflowStatus]
    WORKFLOW_STATUS_FAILED: _ClassVar[WorkflowStatus]
    WORKFLOW_STATUS_PARTIALLY_SUCCEEDED: _ClassVar[WorkflowStatus]
    WORKFLOW_STATUS_CANCELLED: _ClassVar[WorkflowStatus]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_AGENT_START: _ClassVar[EventType]
    EVENT_TYPE_MEMORY_RECALLED: _ClassVar[EventType]
    EVENT_TYPE_GENERATION_CHUNK: _ClassVar[EventType]
    EVENT_TYPE_TOOL_EXECUTE: _ClassVar[EventType]
    EVENT_TYPE_ARTIFACT_SAVED: _ClassVar[EventType]
    EVENT_TYPE_BUDGET_ALERT: _ClassVar[EventType]
    EVENT_TYPE_AGENT_COMPLETE: _ClassVar[EventType]
    EVENT_TYPE_AGENT_FAILED: _ClassVar[EventType]
    EVENT_TYPE_HANDOFF: _ClassVar[EventType]
    EVENT_TYPE_TASK_START: _ClassVar[EventType]
    EVENT_TYPE_TASK_COMPLETE: _ClassVar[EventType]
    EVENT_TYPE_WORKFLOW_COMPLETE: _ClassVar[EventType]
    EVENT_TYPE_WORKFLOW_START: _ClassVar[EventType]
    EVENT_TYPE_GENERATION_COMPLETE: _ClassVar[EventType]
    EVENT_TYPE_MEMORY_WRITTEN: _ClassVar[EventType]
    EVENT_TYPE_DEGRADED: _ClassVar[EventType]

class EventPriority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_PRIORITY_UNSPECIFIED: _ClassVar[EventPriority]
    EVENT_PRIORITY_LOW: _ClassVar[EventPriority]
    EVENT_PRIORITY_NORMAL: _ClassVar[EventPriority]
    EVENT_PRIORITY_HIGH: _ClassVar[EventPriority]
    EVENT_PRIORITY_CRITICAL: _ClassVar[EventPriority]
BUDGET_ENFORCEMENT_UNSPECIFIED: BudgetEnforcement
BUDGET_ENFORCEMENT_RESERVE: BudgetEnforcement
BUDGET_ENFORCEMENT_TRACK: BudgetEnforcement
BUDGET_ENFORCEMENT_DISABLED: BudgetEnforcement
DEGRADED_COMPONENT_UNSPECIFIED: DegradedComponent
DEGRADED_COMPONENT_MEMORY_RECALL: DegradedComponent
DEGRADED_COMPONENT_MEMORY_WRITE_BACK: DegradedComponent
DEGRADED_COMPONENT_HISTORY: DegradedComponent
DEGRADED_COMPONENT_BUDGET: DegradedComponent
DEGRADED_COMPONENT_ARTIFACT: DegradedComponent
DEGRADED_COMPONENT_TOOL: DegradedComponent
DEGRADED_COMPONENT_MODEL_FALLBACK: DegradedComponent
COMBINE_MODE_UNSPECIFIED: CombineMode
COMBINE_MODE_FIRST: CombineMode
COMBINE_MODE_ALL: CombineMode
COMBINE_MODE_JUDGE: CombineMode
TASK_STATUS_UNSPECIFIED: TaskStatus
TASK_STATUS_PENDING: TaskStatus
TASK_STATUS_RUNNING: TaskStatus
TASK_STATUS_SUCCEEDED: TaskStatus
TASK_STATUS_FAILED: TaskStatus
TASK_STATUS_SKIPPED: TaskStatus
TASK_STATUS_CANCELLED: TaskStatus
WORKFLOW_STATUS_UNSPECIFIED: WorkflowStatus
WORKFLOW_STATUS_SUCCEEDED: WorkflowStatus
WORKFLOW_STATUS_FAILED: WorkflowStatus
WORKFLOW_STATUS_PARTIALLY_SUCCEEDED: WorkflowStatus
WORKFLOW_STATUS_CANCELLED: WorkflowStatus
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_AGENT_START: EventType
EVENT_TYPE_MEMORY_RECALLED: EventType
EVENT_TYPE_GENERATION_CHUNK: EventType
EVENT_TYPE_TOOL_EXECUTE: EventType
EVENT_TYPE_ARTIFACT_SAVED: EventType
EVENT_TYPE_BUDGET_ALERT: EventType
EVENT_TYPE_AGENT_COMPLETE: EventType
EVENT_TYPE_AGENT_FAILED: EventType
EVENT_TYPE_HANDOFF: EventType
EVENT_TYPE_TASK_START: EventType
EVENT_TYPE_TASK_COMPLETE: EventType
EVENT_TYPE_WORKFLOW_COMPLETE: EventType
EVENT_TYPE_WORKFLOW_START: EventType
EVENT_TYPE_GENERATION_COMPLETE: EventType
EVENT_TYPE_MEMORY_WRITTEN: EventType
EVENT_TYPE_DEGRADED: EventType
EVENT_PRIORITY_UNSPECIFIED: EventPriority
EVENT_PRIORITY_LOW: EventPriority
EVENT_PRIORITY_NORMAL: EventPriority
EVENT_PRIORITY_HIGH: EventPriority
EVENT_PRIORITY_CRITICAL: EventPriority

class AgentDefinition(_message.Message):
    __slots__ = ("name", "description", "system_prompt", "model", "fallback_models", "sampling", "memory", "budget", "output_artifact_type", "allowed_tools", "input_description", "output_description", "max_tool_iterations", "create_time", "update_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MODELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ARTIFACT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    INPUT_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOOL_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    system_prompt: str
    model: str
    fallback_models: _containers.RepeatedScalarFieldContainer[str]
    sampling: SamplingConfig
    memory: MemoryConfig
    budget: BudgetPolicy
    output_artifact_type: str
    allowed_tools: _containers.RepeatedScalarFieldContainer[str]
    input_description: str
    output_description: str
    max_tool_iterations: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., system_prompt: _Optional[str] = ..., model: _Optional[str] = ..., fallback_models: _Optional[_Iterable[str]] = ..., sampling: _Optional[_Union[SamplingConfig, _Mapping]] = ..., memory: _Optional[_Union[MemoryConfig, _Mapping]] = ..., budget: _Optional[_Union[BudgetPolicy, _Mapping]] = ..., output_artifact_type: _Optional[str] = ..., allowed_tools: _Optional[_Iterable[str]] = ..., input_description: _Optional[str] = ..., output_description: _Optional[str] = ..., max_tool_iterations: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SamplingConfig(_message.Message):
    __slots__ = ("temperature", "max_tokens", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    max_tokens: int
    top_p: float
    def __init__(self, temperature: _Optional[float] = ..., max_tokens: _Optional[int] = ..., top_p: _Optional[float] = ...) -> None: ...

class MemoryConfig(_message.Message):
    __slots__ = ("enabled", "namespace", "recall_limit", "score_threshold", "write_back", "history_enabled", "history_token_budget")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    RECALL_LIMIT_FIELD_NUMBER: _ClassVar[int]
    SCORE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WRITE_BACK_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ENABLED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    namespace: str
    recall_limit: int
    score_threshold: float
    write_back: bool
    history_enabled: bool
    history_token_budget: int
    def __init__(self, enabled: _Optional[bool] = ..., namespace: _Optional[str] = ..., recall_limit: _Optional[int] = ..., score_threshold: _Optional[float] = ..., write_back: _Optional[bool] = ..., history_enabled: _Optional[bool] = ..., history_token_budget: _Optional[int] = ...) -> None: ...

class BudgetPolicy(_message.Message):
    __slots__ = ("enforcement", "max_cost_micros_per_run", "max_tokens_per_run")
    ENFORCEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_MICROS_PER_RUN_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_RUN_FIELD_NUMBER: _ClassVar[int]
    enforcement: BudgetEnforcement
    max_cost_micros_per_run: int
    max_tokens_per_run: int
    def __init__(self, enforcement: _Optional[_Union[BudgetEnforcement, str]] = ..., max_cost_micros_per_run: _Optional[int] = ..., max_tokens_per_run: _Optional[int] = ...) -> None: ...

class ToolDefinition(_message.Message):
    __slots__ = ("name", "description", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ToolError(_message.Message):
    __slots__ = ("code", "message", "retryable")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    retryable: bool
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class ToolCallRecord(_message.Message):
    __slots__ = ("tool_call_id", "tool_name", "arguments", "result", "error", "duration", "iteration")
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    tool_call_id: str
    tool_name: str
    arguments: str
    result: str
    error: ToolError
    duration: _duration_pb2.Duration
    iteration: int
    def __init__(self, tool_call_id: _Optional[str] = ..., tool_name: _Optional[str] = ..., arguments: _Optional[str] = ..., result: _Optional[str] = ..., error: _Optional[_Union[ToolError, _Mapping]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., iteration: _Optional[int] = ...) -> None: ...

class DegradedNote(_message.Message):
    __slots__ = ("component", "reason", "message")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    component: DegradedComponent
    reason: str
    message: str
    def __init__(self, component: _Optional[_Union[DegradedComponent, str]] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Handoff(_message.Message):
    __slots__ = ("from_agent", "to_agent", "reason", "input")
    FROM_AGENT_FIELD_NUMBER: _ClassVar[int]
    TO_AGENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    from_agent: str
    to_agent: str
    reason: str
    input: str
    def __init__(self, from_agent: _Optional[str] = ..., to_agent: _Optional[str] = ..., reason: _Optional[str] = ..., input: _Optional[str] = ...) -> None: ...

class AgentResult(_message.Message):
    __slots__ = ("agent", "output", "artifact_ids", "usage", "cost_micros", "currency", "context_id", "trace_id", "degraded", "tool_calls", "model", "backend", "upstream_model", "fallback_used", "llm_calls", "memories_recalled", "latency", "handoff")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_IDS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_USED_FIELD_NUMBER: _ClassVar[int]
    LLM_CALLS_FIELD_NUMBER: _ClassVar[int]
    MEMORIES_RECALLED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    agent: str
    output: str
    artifact_ids: _containers.RepeatedScalarFieldContainer[str]
    usage: _common_pb2.Usage
    cost_micros: int
    currency: str
    context_id: str
    trace_id: str
    degraded: _containers.RepeatedCompositeFieldContainer[DegradedNote]
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCallRecord]
    model: str
    backend: str
    upstream_model: str
    fallback_used: bool
    llm_calls: int
    memories_recalled: int
    latency: _duration_pb2.Duration
    handoff: Handoff
    def __init__(self, agent: _Optional[str] = ..., output: _Optional[str] = ..., artifact_ids: _Optional[_Iterable[str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_micros: _Optional[int] = ..., currency: _Optional[str] = ..., context_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., degraded: _Optional[_Iterable[_Union[DegradedNote, _Mapping]]] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCallRecord, _Mapping]]] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., upstream_model: _Optional[str] = ..., fallback_used: _Optional[bool] = ..., llm_calls: _Optional[int] = ..., memories_recalled: _Optional[int] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ...) -> None: ...

class WorkflowDefinition(_message.Message):
    __slots__ = ("workflow_id", "display_name", "tasks", "continue_on_failure")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    display_name: str
    tasks: _containers.RepeatedCompositeFieldContainer[TaskSpec]
    continue_on_failure: bool
    def __init__(self, workflow_id: _Optional[str] = ..., display_name: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[TaskSpec, _Mapping]]] = ..., continue_on_failure: _Optional[bool] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("task_id", "agent", "input_template", "depends_on", "fan_out", "allow_handoff", "max_handoffs", "model", "timeout")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    FAN_OUT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_HANDOFF_FIELD_NUMBER: _ClassVar[int]
    MAX_HANDOFFS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    agent: str
    input_template: str
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    fan_out: FanOut
    allow_handoff: bool
    max_handoffs: int
    model: str
    timeout: _duration_pb2.Duration
    def __init__(self, task_id: _Optional[str] = ..., agent: _Optional[str] = ..., input_template: _Optional[str] = ..., depends_on: _Optional[_Iterable[str]] = ..., fan_out: _Optional[_Union[FanOut, _Mapping]] = ..., allow_handoff: _Optional[bool] = ..., max_handoffs: _Optional[int] = ..., model: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class FanOut(_message.Message):
    __slots__ = ("agents", "models", "combine", "judge_agent")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    JUDGE_AGENT_FIELD_NUMBER: _ClassVar[int]
    agents: AgentList
    models: ModelList
    combine: CombineMode
    judge_agent: str
    def __init__(self, agents: _Optional[_Union[AgentList, _Mapping]] = ..., models: _Optional[_Union[ModelList, _Mapping]] = ..., combine: _Optional[_Union[CombineMode, str]] = ..., judge_agent: _Optional[str] = ...) -> None: ...

class AgentList(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agents: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class BranchResult(_message.Message):
    __slots__ = ("branch", "agent", "model", "result", "error", "selected")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    branch: str
    agent: str
    model: str
    result: AgentResult
    error: _status_pb2.Status
    selected: bool
    def __init__(self, branch: _Optional[str] = ..., agent: _Optional[str] = ..., model: _Optional[str] = ..., result: _Optional[_Union[AgentResult, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., selected: _Optional[bool] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("task_id", "status", "output", "result", "branches", "handoffs", "error", "usage", "cost_micros", "start_time", "end_time")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    HANDOFFS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: TaskStatus
    output: str
    result: AgentResult
    branches: _containers.RepeatedCompositeFieldContainer[BranchResult]
    handoffs: _containers.RepeatedCompositeFieldContainer[Handoff]
    error: _status_pb2.Status
    usage: _common_pb2.Usage
    cost_micros: int
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[_Union[TaskStatus, str]] = ..., output: _Optional[str] = ..., result: _Optional[_Union[AgentResult, _Mapping]] = ..., branches: _Optional[_Iterable[_Union[BranchResult, _Mapping]]] = ..., handoffs: _Optional[_Iterable[_Union[Handoff, _Mapping]]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_micros: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AgentEvent(_message.Message):
    __slots__ = ("event_id", "type", "context", "create_time", "trace_id", "priority", "agent", "sequence", "trimmed", "agent_start", "memory_recalled", "generation_chunk", "tool_execute", "artifact_saved", "budget_alert", "agent_complete", "agent_failed", "handoff", "task_start", "task_complete", "workflow_complete", "workflow_start", "generation_complete", "memory_written", "degraded")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TRIMMED_FIELD_NUMBER: _ClassVar[int]
    AGENT_START_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RECALLED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TOOL_EXECUTE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SAVED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ALERT_FIELD_NUMBER: _ClassVar[int]
    AGENT_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    AGENT_FAILED_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    TASK_START_FIELD_NUMBER: _ClassVar[int]
    TASK_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_START_FIELD_NUMBER: _ClassVar[int]
    GENERATION_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    type: EventType
    context: _common_pb2.RequestContext
    create_time: _timestamp_pb2.Timestamp
    trace_id: str
    priority: EventPriority
    agent: str
    sequence: int
    trimmed: bool
    agent_start: AgentStart
    memory_recalled: MemoryRecalled
    generation_chunk: GenerationChunk
    tool_execute: ToolCallRecord
    artifact_saved: ArtifactSaved
    budget_alert: BudgetAlert
    agent_complete: AgentResult
    agent_failed: AgentFailed
    handoff: Handoff
    task_start: TaskStart
    task_complete: TaskResult
    workflow_complete: WorkflowComplete
    workflow_start: WorkflowStart
    generation_complete: GenerationComplete
    memory_written: MemoryWritten
    degraded: DegradedNote
    def __init__(self, event_id: _Optional[str] = ..., type: _Optional[_Union[EventType, str]] = ..., context: _Optional[_Union[_common_pb2.RequestContext, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_id: _Optional[str] = ..., priority: _Optional[_Union[EventPriority, str]] = ..., agent: _Optional[str] = ..., sequence: _Optional[int] = ..., trimmed: _Optional[bool] = ..., agent_start: _Optional[_Union[AgentStart, _Mapping]] = ..., memory_recalled: _Optional[_Union[MemoryRecalled, _Mapping]] = ..., generation_chunk: _Optional[_Union[GenerationChunk, _Mapping]] = ..., tool_execute: _Optional[_Union[ToolCallRecord, _Mapping]] = ..., artifact_saved: _Optional[_Union[ArtifactSaved, _Mapping]] = ..., budget_alert: _Optional[_Union[BudgetAlert, _Mapping]] = ..., agent_complete: _Optional[_Union[AgentResult, _Mapping]] = ..., agent_failed: _Optional[_Union[AgentFailed, _Mapping]] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ..., task_start: _Optional[_Union[TaskStart, _Mapping]] = ..., task_complete: _Optional[_Union[TaskResult, _Mapping]] = ..., workflow_complete: _Optional[_Union[WorkflowComplete, _Mapping]] = ..., workflow_start: _Optional[_Union[WorkflowStart, _Mapping]] = ..., generation_complete: _Optional[_Union[GenerationComplete, _Mapping]] = ..., memory_written: _Optional[_Union[MemoryWritten, _Mapping]] = ..., degraded: _Optional[_Union[DegradedNote, _Mapping]] = ...) -> None: ...

class AgentStart(_message.Message):
    __slots__ = ("input", "model")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    input: str
    model: str
    def __init__(self, input: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class MemoryRecalled(_message.Message):
    __slots__ = ("namespace", "chunk_ids")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, namespace: _Optional[str] = ..., chunk_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerationChunk(_message.Message):
    __slots__ = ("text", "iteration")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    text: str
    iteration: int
    def __init__(self, text: _Optional[str] = ..., iteration: _Optional[int] = ...) -> None: ...

class GenerationComplete(_message.Message):
    __slots__ = ("iteration", "model", "backend", "upstream_model", "usage", "cost_micros", "finish_reason", "latency", "cached", "fallback_used")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_USED_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    model: str
    backend: str
    upstream_model: str
    usage: _common_pb2.Usage
    cost_micros: int
    finish_reason: str
    latency: _duration_pb2.Duration
    cached: bool
    fallback_used: bool
    def __init__(self, iteration: _Optional[int] = ..., model: _Optional[str] = ..., backend: _Optional[str] = ..., upstream_model: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_micros: _Optional[int] = ..., finish_reason: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cached: _Optional[bool] = ..., fallback_used: _Optional[bool] = ...) -> None: ...

class ArtifactSaved(_message.Message):
    __slots__ = ("artifact_id", "artifact_type", "size_bytes")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    artifact_type: str
    size_bytes: int
    def __init__(self, artifact_id: _Optional[str] = ..., artifact_type: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class MemoryWritten(_message.Message):
    __slots__ = ("namespace", "chunk_ids")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, namespace: _Optional[str] = ..., chunk_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class BudgetAlert(_message.Message):
    __slots__ = ("alert_id", "budget_id", "threshold_percent", "spent_micros", "limit_micros", "spent_tokens", "limit_tokens", "currency")
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SPENT_MICROS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SPENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    alert_id: str
    budget_id: str
    threshold_percent: int
    spent_micros: int
    limit_micros: int
    spent_tokens: int
    limit_tokens: int
    currency: str
    def __init__(self, alert_id: _Optional[str] = ..., budget_id: _Optional[str] = ..., threshold_percent: _Optional[int] = ..., spent_micros: _Optional[int] = ..., limit_micros: _Optional[int] = ..., spent_tokens: _Optional[int] = ..., limit_tokens: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class AgentFailed(_message.Message):
    __slots__ = ("error", "partial_output", "usage", "cost_micros", "tool_calls", "degraded", "currency")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    error: _status_pb2.Status
    partial_output: str
    usage: _common_pb2.Usage
    cost_micros: int
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCallRecord]
    degraded: _containers.RepeatedCompositeFieldContainer[DegradedNote]
    currency: str
    def __init__(self, error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., partial_output: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_micros: _Optional[int] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCallRecord, _Mapping]]] = ..., degraded: _Optional[_Iterable[_Union[DegradedNote, _Mapping]]] = ..., currency: _Optional[str] = ...) -> None: ...

class TaskStart(_message.Message):
    __slots__ = ("task_id", "input", "branch")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    input: str
    branch: str
    def __init__(self, task_id: _Optional[str] = ..., input: _Optional[str] = ..., branch: _Optional[str] = ...) -> None: ...

class WorkflowStart(_message.Message):
    __slots__ = ("workflow_id", "task_count")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_COUNT_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    task_count: int
    def __init__(self, workflow_id: _Optional[str] = ..., task_count: _Optional[int] = ...) -> None: ...

class WorkflowComplete(_message.Message):
    __slots__ = ("workflow_id", "status", "usage", "cost_micros", "latency", "error")
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    status: WorkflowStatus
    usage: _common_pb2.Usage
    cost_micros: int
    latency: _duration_pb2.Duration
    error: _status_pb2.Status
    def __init__(self, workflow_id: _Optional[str] = ..., status: _Optional[_Union[WorkflowStatus, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost_micros: _Optional[int] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("send_time",)
    SEND_TIME_FIELD_NUMBER: _ClassVar[int]
    send_time: _timestamp_pb2.Timestamp
    def __init__(self, send_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
