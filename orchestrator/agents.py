"""Declarative agent definitions: loaded from files at start-up and
registered over gRPC afterwards.

An agent file is TOML or JSON, one agent per file, with the fields of
``hivemesh.orchestrator.v1.AgentDefinition`` (proto JSON names, e.g.::

    name = "coder"
    system_prompt = "You are a coding expert."
    model = "mock-small"
    fallback_models = ["mock-large"]
    output_artifact_type = "code"
    [memory]
    enabled = true
    write_back = true

A bad file stops start-up with its path and the first problem. Agents
registered over gRPC are kept in ``<data_dir>/agents.json`` (written
atomically) so they survive a restart; files win over stored agents of the
same name at start-up. With the ``redis`` state backend registered agents
live in Redis instead (``redis_state.RedisAgents``, same rules).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import grpc
import protovalidate
from google.protobuf import json_format

from hivemesh.orchestrator.v1 import AgentDefinition
from hivemesh.runtime import errors
from hivemesh.runtime.wellknown import now_us
from hivemesh.services.orchestrator import caps, templates


class AgentFileError(ValueError):
    pass


def parse_agent(data: dict, origin: str, *, check_definition: bool = True) -> AgentDefinition:
    """An agent from its JSON-like form; ``check_definition`` also refuses
    what would make every run fail (files and registrations; the store keeps
    what was accepted when it was registered)."""
    agent = AgentDefinition()
    try:
        json_format.ParseDict(data, agent)
    except json_format.ParseError as exc:
        raise AgentFileError(f"{origin}: {exc}") from None
    violations = protovalidate.Validator().collect_violations(agent)
    if violations:
        first = violations[0].proto
        where = ".".join(e.field_name for e in first.field.elements) or "agent"
        raise AgentFileError(f"{origin}: {where}: {first.message or first.rule_id}")
    problems = definition_problems(agent) if check_definition else []
    if problems:
        raise AgentFileError(f"{origin}: {problems[0][0]}: {problems[0][1]}")
    return agent


def definition_problems(agent: AgentDefinition) -> list[tuple[str, str]]:
    """(field, problem) of what would make every run of the agent fail or
    do what was not meant, beyond the contract's field rules."""
    found = [("system_prompt", p) for p in templates.unknown_references(agent.system_prompt)]
    seen = {agent.model}
    for i, model in enumerate(agent.fallback_models):
        if model in seen:
            found.append((f"fallback_models[{i}]", f"{model!r} is already in the chain"))
        seen.add(model)
    return found + caps.definition_problems(agent)


def load_agent_file(path: Path) -> AgentDefinition:
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AgentFileError(f"{path}: {exc}") from None
    return parse_agent(data, str(path))


class AgentRegistry:
    def __init__(self, store_path: Path | None = None) -> None:
        self._agents: dict[str, AgentDefinition] = {}
        # Names registered over gRPC (and kept in the store); the others come
        # from files, read again at every start and never stored.
        self._registered: set[str] = set()
        # Where each agent loaded at start came from (its file, or the store).
        self._sources: dict[str, str] = {}
        self._store_path = store_path
        if store_path is not None and store_path.exists():
            for data in json.loads(store_path.read_text()):
                agent = parse_agent(data, str(store_path), check_definition=False)
                self._agents[agent.name] = agent
                self._registered.add(agent.name)
                self._sources[agent.name] = str(store_path)

    @classmethod
    def of(cls, agents) -> AgentRegistry:
        """A registry holding ``agents`` as they are (nothing is stored)."""
        registry = cls()
        registry._agents = {agent.name: agent for agent in agents}
        return registry

    def snapshot(self) -> AgentRegistry:
        """The agents as they are now, untouched by later registrations and
        deletions (which replace or drop entries, never change one)."""
        return AgentRegistry.of(self._agents.values())

    def load_dir(self, directory: Path) -> list[str]:
        """Load every ``*.toml``/``*.json`` agent file; returns the names."""
        if not directory.is_dir():
            raise AgentFileError(f"{directory}: not a directory")
        names = []
        for path in sorted(directory.iterdir()):
            if path.suffix in (".toml", ".json"):
                agent = load_agent_file(path)
                if agent.name in names:
                    raise AgentFileError(f"{path}: agent {agent.name!r} is defined twice")
                self._put(agent)
                self._registered.discard(agent.name)  # the file wins
                self._sources[agent.name] = str(path)
                names.append(agent.name)
        return names

    def source(self, name: str) -> str:
        """The file an agent loaded at start came from; "" for another."""
        return self._sources.get(name, "")

    def get(self, name: str) -> AgentDefinition:
        agent = self._agents.get(name)
        if agent is None:
            raise errors.not_found("agent", name)
        return agent

    def find(self, name: str) -> AgentDefinition | None:
        return self._agents.get(name)

    def names(self) -> list[str]:
        return sorted(self._agents)

    def after(self, name: str, limit: int) -> list[AgentDefinition]:
        """Agents ordered by name, strictly after ``name``."""
        return [self._agents[n] for n in self.names() if n > name][:limit]

    def register(self, agent: AgentDefinition, allow_update: bool) -> tuple[AgentDefinition, bool]:
        existing = self._agents.get(agent.name)
        if existing is not None and not allow_update:
            raise errors.ServiceError(
                grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS",
                f"agent {agent.name!r} already exists (set allow_update to replace it)",
                {"agent": agent.name})
        stored = AgentDefinition()
        stored.CopyFrom(agent)
        stamp = now_us()
        stored.update_time.FromMicroseconds(stamp)
        if existing is not None:
            stored.create_time.CopyFrom(existing.create_time)
        else:
            stored.create_time.FromMicroseconds(stamp)
        self._put(stored)
        self._registered.add(stored.name)
        self._save()
        return stored, existing is None

    def delete(self, name: str) -> bool:
        if self._agents.pop(name, None) is None:
            return False
        self._registered.discard(name)
        self._save()
        return True

    def _put(self, agent: AgentDefinition) -> None:
        if not agent.HasField("create_time"):
            agent.create_time.FromMicroseconds(now_us())
            agent.update_time.CopyFrom(agent.create_time)
        self._agents[agent.name] = agent

    def _save(self) -> None:
        if self._store_path is None:
            return
        self._store_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._store_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump([json_format.MessageToDict(self._agents[n])
                       for n in sorted(self._registered)], f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._store_path)
