"""An agent's per-run caps (``BudgetPolicy.max_cost_micros_per_run`` and
``max_tokens_per_run``): each generation asks for at most the tokens the run
has left, and a run found over a cap, or needing another call once at one,
fails with RESOURCE_EXHAUSTED, reason BUDGET_EXCEEDED, before anything of it
is kept (a run that ends exactly at a cap succeeds).

Tokens are known from the LLM service's answers, so the token cap holds
whatever the enforcement; cost is known only from the information service's
charges, so the cost cap needs budget accounting (RESERVE or TRACK) and an
agent that disables it may not set one."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from hivemesh.llm.v1 import Message
from hivemesh.orchestrator.v1 import AgentDefinition, AgentResult, BudgetEnforcement
from hivemesh.runtime import errors
from hivemesh.runtime.text import estimate_tokens

# Most tokens per generation when the agent's sampling does not say.
DEFAULT_MAX_TOKENS = 1024


def estimate_prompt_tokens(messages: Iterable[Message]) -> int:
    """A conversation's prompt tokens, estimated as the LLM service does when
    it cannot count them: each message's text plus a few tokens of framing."""
    return sum(4 + estimate_tokens(m.content) + sum(
        estimate_tokens(c.arguments) + estimate_tokens(c.name) for c in m.tool_calls)
        for m in messages) + 2


def definition_problems(agent: AgentDefinition) -> list[tuple[str, str]]:
    """(field, problem) of caps that could not be held."""
    if (agent.budget.max_cost_micros_per_run and agent.budget.enforcement
            == BudgetEnforcement.BUDGET_ENFORCEMENT_DISABLED):
        return [("budget.max_cost_micros_per_run", "a cost cap needs budget accounting: with "
                 "BUDGET_ENFORCEMENT_DISABLED no call is priced")]
    return []


def completion_limit(agent: AgentDefinition, spent: AgentResult,
                     messages: Iterable[Message], most: int = 0) -> int:
    """Most tokens the next generation may produce: the agent's max_tokens
    (at most ``most``, the model's max_output_tokens, when known: the LLM
    service sends no more), within what the token cap leaves after
    ``spent`` and the prompt. Raises BUDGET_EXCEEDED when the run has
    nothing left for another call."""
    limit = agent.sampling.max_tokens or DEFAULT_MAX_TOKENS
    if most > 0:
        limit = min(limit, most)
    policy = agent.budget
    cost_cap = policy.max_cost_micros_per_run
    if cost_cap and spent.cost_micros >= cost_cap:
        raise over_cap("micros", cost_cap, spent.cost_micros, "nothing is left for another call")
    if policy.max_tokens_per_run:
        prompt = estimate_prompt_tokens(messages)
        left = policy.max_tokens_per_run - spent.usage.total_tokens - prompt
        if left <= 0:
            raise over_cap("tokens", policy.max_tokens_per_run, spent.usage.total_tokens,
                           f"the next call's prompt alone is about {prompt} tokens")
        limit = min(limit, left)
    return limit


def check_spent(agent: AgentDefinition, spent: AgentResult) -> None:
    """BUDGET_EXCEEDED when the run has spent more than a cap allows."""
    policy = agent.budget
    for limit, used, unit in ((policy.max_cost_micros_per_run, spent.cost_micros, "micros"),
                              (policy.max_tokens_per_run, spent.usage.total_tokens, "tokens")):
        if limit and used > limit:
            raise over_cap(unit, limit, used, "over the cap")


def over_cap(unit: str, limit: int, spent: int, why: str) -> errors.ServiceError:
    return errors.ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "BUDGET_EXCEEDED",
        f"the run has spent {spent} {unit} of the agent's per-run cap of {limit}: {why}",
        {"scope": "run", "unit": unit, "limit": str(limit), "spent": str(spent)})
