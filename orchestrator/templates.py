r"""``{{variables.<name>}}`` and ``{{tasks.<task_id>.output}}`` references in
system prompts and task inputs: found before anything runs, so a bad
reference is INVALID_ARGUMENT, and expanded when the values are known.

A backslash right before two opening braces escapes them: ``\{{`` is not
the start of a reference and renders as ``{{``, so a prompt can hold a
literal ``{{word}}`` (written ``\{{word}}``). Nothing else is an escape: a
backslash anywhere else, also one before a single brace, is kept as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# An escaped "{{" or a reference, whichever starts first: read from left to
# right, the braces an escape takes can never open a reference.
_TOKEN = re.compile(r"\\\{\{|\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")
_VARIABLE = re.compile(r"^variables\.([A-Za-z_][A-Za-z0-9_]{0,63})$")
_TASK_OUTPUT = re.compile(r"^tasks\.([a-z][a-z0-9_-]{0,63})\.output$")


def references(template: str) -> list[str]:
    r"""Every reference in the template, in order (``variables.x``, ...);
    escaped braces (``\{{``) start none."""
    return [m.group(1) for m in _TOKEN.finditer(template) if m.group(1) is not None]


def unknown_references(template: str) -> list[str]:
    """References that are not ``{{variables.<name>}}`` (all an agent's
    system prompt may hold: it is rendered with the run's variables)."""
    return [f"{{{{{ref}}}}}: unknown reference (a system prompt may use "
            "{{variables.<name>}} only)" for ref in references(template)
            if _VARIABLE.match(ref) is None]


def problems(template: str, variables: Mapping[str, str],
             tasks: frozenset[str] = frozenset(), *, allow_tasks: bool = False) -> list[str]:
    """What is wrong with the template's references (empty: nothing)."""
    found = []
    for ref in references(template):
        if (m := _VARIABLE.match(ref)) is not None:
            if m.group(1) not in variables:
                found.append(f"{{{{{ref}}}}}: no variable {m.group(1)!r} was given")
        elif allow_tasks and (m := _TASK_OUTPUT.match(ref)) is not None:
            if m.group(1) not in tasks:
                found.append(f"{{{{{ref}}}}}: task {m.group(1)!r} is not a dependency")
        else:
            found.append(f"{{{{{ref}}}}}: unknown reference")
    return found


def render(template: str, variables: Mapping[str, str],
           outputs: Mapping[str, str] | None = None) -> str:
    r"""The template with every reference replaced and every escaped
    ``\{{`` written ``{{``, in one pass (a value is never read as a
    template); call ``problems`` first."""
    def value(match: re.Match) -> str:
        ref = match.group(1)
        if ref is None:
            return "{{"
        if (m := _VARIABLE.match(ref)) is not None:
            return variables[m.group(1)]
        m = _TASK_OUTPUT.match(ref)
        return (outputs or {})[m.group(1)] if m is not None else match.group(0)
    return _TOKEN.sub(value, template)
