"""Counts the commands an orchestrator sends to its Redis state backend: the
client's ``execute_command`` wrapped (one command, one round trip), each
script named as in ``redis_state`` with the key it works on."""

from __future__ import annotations

from collections import Counter


class CommandLog:
    """Every command ``state`` (a RedisState) sends from now on, as
    ``(name, subject)``: a script's name and its first argument after the
    prefix (a request's ``kind:request_id``, an agent's name), or a plain
    command's name and ``""``."""

    def __init__(self, state) -> None:
        self.commands: list[tuple[str, str]] = []
        names = {script.sha: name for name, script in state._scripts.items()}
        client = state.client
        send = client.execute_command

        async def execute_command(*args, **options):
            name, subject = str(args[0]).upper(), ""
            if name in ("EVALSHA", "EVAL") and len(args) > 5:
                # EVALSHA sha numkeys prefix | prefix subject ...
                name, subject = names.get(args[1], name), str(args[5])
            self.commands.append((name, subject))
            return await send(*args, **options)
        client.execute_command = execute_command

    def clear(self) -> None:
        self.commands.clear()

    def counts(self) -> Counter[str]:
        return Counter(name for name, _ in self.commands)

    def line(self) -> str:
        return ", ".join(f"{name} {subject}".strip() for name, subject in self.commands)
