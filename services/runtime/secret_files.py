"""The secrets directory as a settings source: one file per variable,
named like it (nested ones with ``__``), the service's own files only."""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path
from typing import Union, get_args, get_origin

from pydantic_settings import PydanticBaseSettingsSource, SettingsError
from pydantic_settings.sources import NestedSecretsSettingsSource


def _is_mapping(annotation: object) -> bool:
    """A dict setting (``dict[str, X]``, optional or not), not a section."""
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_mapping(arg) for arg in get_args(annotation))
    origin = get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, Mapping)


class SecretsDirectorySource(NestedSecretsSettingsSource):
    """The secrets directory, read for the service's own files only (named
    with its prefix): a mounted Secret may hold other files, a binary
    keystore or another service's keys, that are no setting of this one
    and must not stop it (pydantic-settings would read every file as UTF-8
    text)."""

    def __init__(self, file_secret_settings: PydanticBaseSettingsSource,
                 environment: PydanticBaseSettingsSource) -> None:
        # The environment's source: see __call__.
        self.environment = environment
        try:
            super().__init__(file_secret_settings, secrets_nested_delimiter="__")
        except SettingsError as exc:
            # Which directory: pydantic-settings says only "secrets_dir".
            raise SettingsError(f"the secrets directory {self.secrets_dir}: {exc}") from None

    def __call__(self) -> dict:
        # pydantic-settings merges the sources' dicts key by key, so a JSON
        # object setting (tool servers, backends, prices) given in both
        # places would be the union of the two rather than the
        # environment's. A section (``server``) still takes its nested
        # settings from both, and so does a dict the environment sets
        # only nested keys of (HIVEMESH_LLM_BACKENDS__OPENAI__...).
        try:
            found = super().__call__()
        except SettingsError as exc:
            raise SettingsError(f"{exc}, the secrets directory {self.secrets_dir}") from None
        given = getattr(self.environment, "env_vars", None)
        if given is None or not found:
            return found
        for name in list(found):
            field = self.settings_cls.model_fields.get(name)
            # The variable itself set (its JSON), not only nested keys of it.
            variable = f"{self.environment.env_prefix}{name}"
            if not self.environment.case_sensitive:
                variable = variable.lower()
            if field is not None and _is_mapping(field.annotation) and variable in given:
                del found[name]
        return found

    def load_secrets(self, path: Path) -> dict[str, str]:  # type: ignore[override]
        # The directory's own entries only: with '__' between sections a
        # setting's file is never in a subdirectory (nor in Kubernetes'
        # hidden ..data, reached through the top-level links). A link is
        # followed only to a file inside the directory; a setting's file
        # that cannot be read so is an invalid setting, never passed over
        # (a TLS file skipped would leave the port in plaintext).
        prefix = self.secrets_prefix if self.case_sensitive else self.secrets_prefix.lower()
        found = {}
        for file in sorted(path.iterdir()):
            name = file.name
            if not (name if self.case_sensitive else name.lower()).startswith(prefix):
                continue
            try:
                real = file.resolve()
            except (OSError, RuntimeError):  # a loop of links
                raise SettingsError(f"{name} in the secrets directory {path} is a loop of "
                                    "links") from None
            if real.is_dir() and (real == path or path in real.parents):
                # A directory of the volume's own (a key projected to a
                # nested path), not a setting.
                continue
            if not (real.is_file() and path in real.parents):
                raise SettingsError(
                    f"{name} in the secrets directory {path} is not a file there (a link "
                    "out of the directory, or to nothing): copy the file in, or link to "
                    "one inside it") from None
            try:
                found[name] = real.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                # A bad value, as one in the environment would be (the
                # name only: the bytes may be a secret).
                raise SettingsError(f"{name} is not UTF-8 text") from None
        return found
