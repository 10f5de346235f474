"""Structured JSON logs on stderr, carrying trace id, span id and request id.

Secrets never reach a log line: values of keys that look like credentials
are replaced, and so is anything shaped like an API key or bearer token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import time
import urllib.parse
from collections.abc import Collection, Iterable, Mapping

from opentelemetry import trace
from pydantic import BaseModel, SecretStr

from hivemesh.runtime import telemetry
from hivemesh.runtime.middleware import request_id_var

# A name (of a field, setting, header or parameter) holds a credential when
# its last word is one of these: api_key, x-api-key, OPENAI_API_KEY, apiKey,
# access_token, client_secret, secret_key, aws_secret_access_key,
# postgres_dsn, Authorization, and a password's word also glued to what it
# is for (PGPASSWORD). A word ends at anything but a letter or digit, or
# where camelCase starts one, so that counts (tokens, max_tokens,
# token_count) and names about a credential rather than holding one
# (api_key_env, secrets_dir, page_token_hint) are not credentials in free
# text; fields are held to more (_SECRET_KEY).
_SECRET_WORD = (
    r"(?:(?-i:(?<![A-Za-z0-9])|(?<=[a-z])(?=[A-Z]))"
    r"(?:api[_-]?key|secret(?:[_-]?(?:access[_-]?)?key)?|password|passwd|token|authorization"
    r"|dsn)"
    r"|(?<![A-Za-z0-9])[A-Za-z0-9]+?pass(?:word|wd))")
# A field's, a mapping key's or a pair's name is held to more: any of its
# words (api_key_2, OPENAI_API_KEY_BACKUP, password_old, dsn_primary hold
# the credential too), at the cost of hiding some names about one
# (api_key_env, token_count): a value hidden that was no secret is a lesser
# harm than a secret written out. In free text (below) a name must end with
# such a word, as prose about tokens is common there.
_WORD_END = r"(?-i:(?![A-Za-z0-9])|(?<=[a-z])(?=[A-Z]))"
_SECRET_KEY = re.compile(rf"{_SECRET_WORD}{_WORD_END}", re.I)
# Such a name in free text: a run of letters, digits, _ and - that ends
# with such a word (each position of it tried once: time linear in its
# length).
_SECRET_IDENT = rf"(?<![\w-])[\w-]*?{_SECRET_WORD}(?![\w-])"
_SECRET_VALUE = re.compile(
    # such a name given a value, in free text: key=value (query strings,
    # keyword DSNs, environment), a header (x-api-key: value), JSON or a
    # repr ("api_key": "value"); an Authorization value keeps its scheme.
    # The word token alone, then a space (token: value, token = value), is
    # also prose about model tokens: there a bare value is hidden only when
    # shaped like a key (see _hide), so "token: limit reached" or "max
    # token: 10" is left alone.
    rf"(?P<name>(?P<ident>{_SECRET_IDENT})(?P<quoted>[\"'])?(?P<sep>\s*[:=]\s*)"
    r"(?P<auth>(?:Bearer|Basic|Token|Digest)\s+)?)"
    # (a value unquoted ends at a space or &, without the punctuation
    # that closes the text around it)
    r"(?P<value>\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^\s&\"']*[^\s&\"',;.)\]}>])"
    # such a name and its value as a pair, as gRPC metadata is printed:
    # ('x-api-key', 'value'), ("authorization", b"...")
    rf"|(?P<pair>[(\[]\s*(?P<pq>[\"']){_SECRET_IDENT}(?P=pq)\s*,\s*b?)"
    r"(?P<pvalue>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')"
    # a bearer token anywhere; one that looks like a word (Bearer
    # authentication.) is not a token: a token has a digit, a symbol inside
    # it, or capitals after its first letter
    r"|(?P<scheme>\bBearer\s+)"
    r"(?=[A-Za-z0-9._~+/-]*(?:[0-9]|[._~+/-][A-Za-z0-9]|(?-i:[a-z][A-Z])))"
    r"[A-Za-z0-9._~+/-]{8,}=*"
    # provider keys by their shape: OpenAI's and Anthropic's sk-... (not the
    # end of a word such as task- or disk-), Google's AIza...
    r"|(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{8,}"
    r"|(?-i:(?<![A-Za-z0-9_-])AIza[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-]))"
    # credentials in any URL (postgresql://u:pw@, redis://:pw@, https://u:pw@ ...),
    # up to the last @ before the path: URL parsers read an unescaped @ as
    # part of the password; the scheme is taken whole, from the start of
    # its run of characters (tried at each of them, a long run of letters
    # would cost time quadratic in its length)
    r"|(?<![a-z0-9+.\-])[a-z0-9+.\-]++://[^\s:@/]*:[^\s/]*@", re.I)


# A bare value shaped like a key: a letter, and a digit, a symbol between
# two characters or a capital after a small letter (abc123def,
# spaced-out-7, camelCaseKey); a plain word or a number is not one.
# Patterns of fixed width, so that a search stays linear in the value.
_LETTER = re.compile(r"[^\W\d_]")
_KEY_SHAPE = re.compile(r"\d|.[\W_].|[a-z][A-Z]")
_KEY_MIN_CHARS = 16


def _prose(match: re.Match[str]) -> bool:
    """Whether a value given to a name is prose, not a secret: the name is
    the word token alone (not access_token, x-token or authToken), a space
    comes before the value, and the value is bare (unquoted, after neither
    a quoted name nor an Authorization scheme), shorter than a key (a word
    or number of 16 characters or more may be one) and not shaped like one."""
    start = match.start()
    before = match.string[start - 1] if start else " "
    value = match["value"]
    return (match["ident"].lower() == "token"
            and not (before.isalnum() or before in "_-")
            and match["sep"].strip() != match["sep"]
            and not (match["quoted"] or match["auth"] or value[0] in "\"'")
            and len(value) < _KEY_MIN_CHARS
            and not (_LETTER.search(value) and _KEY_SHAPE.search(value)))


def _hide(match: re.Match[str]) -> str:
    """What stays of a secret: the name it was given and its quotes, or
    the scheme of a bearer token; prose is left as it is."""
    if match["pair"] is not None:
        quote = match["pvalue"][0]
        return f"{match['pair']}{quote}[REDACTED]{quote}"
    if match["name"] is not None:
        if _prose(match):
            return match[0]
        value = match["value"]
        quote = value[0] if value[0] in "\"'" else ""
        return f"{match['name']}{quote}[REDACTED]{quote}"
    return f"{match['scheme'] or ''}[REDACTED]"


_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# The secrets this process was configured with (see hide_values): hidden
# wherever they appear, whatever the text around them, since a library may
# quote one in words no pattern above expects (a DSN's password with a
# space, quoted by libpq's parse error, say).
_known: set[str] = set()
_known_pattern: re.Pattern[str] | None = None
# Shorter values would hide ordinary words that happen to match.
_KNOWN_MIN_CHARS = 6


def hide_values(values: Iterable[str]) -> None:
    """Adds secret values to hide in every log line from now on: a URL's
    password is added besides the URL (a message may quote it alone), and
    values under six characters are left out."""
    global _known_pattern
    for value in values:
        for candidate in (value, *_url_password(value)):
            if len(candidate) >= _KNOWN_MIN_CHARS:
                _known.add(candidate)
    if _known:
        _known_pattern = re.compile("|".join(
            re.escape(v) for v in sorted(_known, key=len, reverse=True)))


def _url_password(value: str) -> list[str]:
    """The password of a URL (unescaped, and as written), or of a keyword
    DSN's ``password=``; none otherwise."""
    found: list[str] = []
    with contextlib.suppress(ValueError):
        parts = urllib.parse.urlsplit(value)
        if parts.scheme and parts.password:
            raw = parts.netloc.rpartition("@")[0].partition(":")[2]
            found += [parts.password, urllib.parse.unquote(raw), raw]
    keyword = re.search(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", value)
    if keyword:
        found.append(keyword[1].strip("'"))
        if not keyword[1].startswith("'"):
            # Unquoted, a password with spaces does not parse: libpq's error
            # quotes the word after the first ('missing "=" after "..."'),
            # so each word up to the next key=value one is a secret too.
            rest = value[keyword.end():]
            words = re.match(r"(?:\s+(?![\w.-]+\s*=)\S+)*", rest)[0].split()
            if words:
                found += [*words, " ".join([keyword[1], *words])]
    return found


def secret_values(settings: BaseModel) -> list[str]:
    """Every SecretStr value set in ``settings``, nested models included."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        for item in value.values() if isinstance(value, dict) else (
                value if isinstance(value, list | tuple) else (value,)):
            if isinstance(item, SecretStr):
                found.append(item.get_secret_value())
            elif isinstance(item, BaseModel):
                found += secret_values(item)
    return found


def redact(text: str) -> str:
    if _known_pattern is not None:
        text = _known_pattern.sub("[REDACTED]", text)
    return _SECRET_VALUE.sub(_hide, text)


def _plain(value: object) -> object:
    """``value`` as JSON holds it, its text redacted: a mapping with text
    keys (the value of one named like a credential replaced), a list, a
    finite number; anything else as its (redacted) text, so that no field
    loses the line or makes it something other than JSON."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): "[REDACTED]" if _SECRET_KEY.search(str(k)) else _plain(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        if len(value) == 2 and isinstance(value[0], str) and _SECRET_KEY.search(value[0]):
            # A name and its value, as gRPC metadata holds them: the value
            # goes as a mapping's would.
            return [_plain(value[0]), "[REDACTED]"]
        return [_plain(v) for v in value]
    if isinstance(value, Collection) and not isinstance(value, bytes | bytearray):
        # gRPC's aio Metadata (pairs), a set, a view of a mapping
        return [_plain(v) for v in value]
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = f"{ctx.trace_id:032x}"
            entry["span_id"] = f"{ctx.span_id:016x}"
        else:
            call = telemetry.call_id_var.get()
            if call is not None:
                # What an INTERNAL error of this call names (errors.internal).
                entry["call_id"] = str(call)
        rid = request_id_var.get()
        if rid:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            entry[key] = "[REDACTED]" if _SECRET_KEY.search(key) else _plain(value)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route every logger to one JSON handler on stderr (stdout is for the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
