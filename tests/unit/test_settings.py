"""Service settings: env prefix, nested sections, secrets from files."""

import pytest
from pydantic import ValidationError

from hivemesh.runtime import settings as runtime_settings
from hivemesh.runtime.settings import InvalidSetting, secrets_dir
from hivemesh.services.artifact.settings import ArtifactSettings


def test_env_prefix_and_nested_sections(monkeypatch):
    monkeypatch.setenv("HIVEMESH_ARTIFACT_BACKEND", "memory")
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__PORT", "7001")
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__GRACE_PERIOD_S", "2.5")
    settings = ArtifactSettings()
    assert settings.backend == "memory"
    assert settings.server.port == 7001 and settings.server.grace_period_s == 2.5
    assert settings.max_content_bytes == 8 * 1024 * 1024


def test_secret_from_a_mounted_file_never_shows_in_repr(monkeypatch, tmp_path):
    # The file is named like the environment variable it stands for.
    (tmp_path / "hivemesh_artifact_postgres_dsn").write_text("postgresql://app:s3cret@db/app")
    monkeypatch.setenv("HIVEMESH_SECRETS_DIR", str(tmp_path))
    settings = ArtifactSettings(_secrets_dir=secrets_dir())
    assert settings.postgres_dsn.get_secret_value() == "postgresql://app:s3cret@db/app"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())


def test_nested_settings_come_from_the_secrets_directory_too(monkeypatch, tmp_path):
    """A file named like a nested variable (``__`` between sections) is read
    as that variable would be, for every service; the environment wins."""
    from hivemesh.services.information.settings import InformationSettings
    from hivemesh.services.llm.settings import LlmSettings
    from hivemesh.services.memory.settings import MemorySettings
    from hivemesh.services.orchestrator.settings import OrchestratorSettings
    for cls, prefix in ((ArtifactSettings, "ARTIFACT"), (InformationSettings, "INFORMATION"),
                        (LlmSettings, "LLM"), (MemorySettings, "MEMORY"),
                        (OrchestratorSettings, "ORCHESTRATOR")):
        (tmp_path / f"HIVEMESH_{prefix}_SERVER__DRAIN_DELAY_S").write_text("7\n")
        assert cls(_secrets_dir=tmp_path).server.drain_delay_s == 7, cls
    (tmp_path / "HIVEMESH_ARTIFACT_SERVER__LOG_LEVEL").write_text("debug")
    (tmp_path / "HIVEMESH_ARTIFACT_BACKEND").write_text("memory")
    settings = ArtifactSettings(_secrets_dir=tmp_path)
    assert (settings.server.log_level, settings.backend) == ("DEBUG", "memory")
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__LOG_LEVEL", "WARNING")
    assert ArtifactSettings(_secrets_dir=tmp_path).server.log_level == "WARNING"
    # A bad value there is an invalid setting like one in the environment.
    (tmp_path / "HIVEMESH_ARTIFACT_SERVER__PORT").write_text("70000")
    with pytest.raises(ValidationError, match="port"):
        ArtifactSettings(_secrets_dir=tmp_path)


def test_bad_values_fail_at_construction(monkeypatch):
    monkeypatch.setenv("HIVEMESH_ARTIFACT_BACKEND", "mongodb")
    with pytest.raises(ValidationError):
        ArtifactSettings()


def test_the_artifact_request_ttl_is_a_day_unless_set_and_must_be_positive(monkeypatch):
    assert ArtifactSettings().request_ttl_s == 86400.0
    monkeypatch.setenv("HIVEMESH_ARTIFACT_REQUEST_TTL_S", "3600")
    assert ArtifactSettings().request_ttl_s == 3600.0
    for bad in ("0", "-1", "a day"):
        monkeypatch.setenv("HIVEMESH_ARTIFACT_REQUEST_TTL_S", bad)
        with pytest.raises(ValidationError):
            ArtifactSettings()


@pytest.mark.parametrize("service, variable", [
    ("artifact", "REQUEST_TTL_S"), ("information", "REQUEST_TTL_S"), ("memory", "REQUEST_TTL_S"),
    ("llm", "IDEMPOTENCY_TTL_S"), ("orchestrator", "IDEMPOTENCY_TTL_S"),
    ("information", "HISTORY_RETENTION_S")])
def test_a_retention_past_ten_years_is_an_invalid_setting(monkeypatch, service, variable):
    """Far longer (1e13 s, meant as "forever") overflowed the stores' 64-bit
    microsecond times, and every recorded write failed with INTERNAL."""
    from hivemesh.cli.main import _service  # noqa: PLC0415
    from hivemesh.runtime.settings import MAX_RETENTION_S  # noqa: PLC0415
    settings_cls = _service(service)[0]
    monkeypatch.setenv(f"HIVEMESH_{service.upper()}_{variable}", str(MAX_RETENTION_S))
    assert getattr(settings_cls(), variable.lower()) == MAX_RETENTION_S
    monkeypatch.setenv(f"HIVEMESH_{service.upper()}_{variable}", "1e13")
    with pytest.raises(ValidationError) as err:
        settings_cls()
    assert err.value.errors()[0]["loc"] == (variable.lower(),)


def test_an_llm_alias_falls_back_only_to_an_alias_of_its_kind():
    """A chat request that fell back to an embedding model could only fail
    (and as the caller's bad request): such a chain is refused at start."""
    from hivemesh.services.llm.settings import BackendSettings, LlmSettings, ModelSettings
    backends = {"mock": BackendSettings(type="mock")}
    with pytest.raises(ValidationError, match="kind"):
        LlmSettings(backends=backends, models=[
            ModelSettings(alias="chat", backend="mock", upstream_model="c", fallback=["embed"]),
            ModelSettings(alias="embed", kind="embedding", backend="mock", upstream_model="e")])


def test_an_embedding_model_on_an_anthropic_backend_is_refused_at_start(monkeypatch):
    """Anthropic offers no embeddings: every Embed to it could only fail."""
    from hivemesh.services.llm.settings import BackendSettings, LlmSettings, ModelSettings
    monkeypatch.setenv("ANTHROPIC_TEST_KEY", "k")
    backends = {"claude": BackendSettings(type="anthropic", api_key_env="ANTHROPIC_TEST_KEY")}
    with pytest.raises(ValidationError, match="offers no embeddings"):
        LlmSettings(backends=backends, models=[
            ModelSettings(alias="embed", kind="embedding", backend="claude",
                          upstream_model="e")])


def test_a_secrets_directory_set_explicitly_must_exist(monkeypatch, tmp_path):
    """A secret volume that failed to mount would otherwise start the
    service without its keys (pydantic-settings only warns)."""
    missing = tmp_path / "not-mounted"
    monkeypatch.setenv("HIVEMESH_SECRETS_DIR", str(missing))
    # An invalid setting, as ``serve`` reports it (exit 2).
    with pytest.raises(InvalidSetting, match=f"HIVEMESH_SECRETS_DIR={missing} does not exist"):
        secrets_dir()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    monkeypatch.setenv("HIVEMESH_SECRETS_DIR", str(a_file))
    with pytest.raises(InvalidSetting, match=f"HIVEMESH_SECRETS_DIR={a_file} is not a directory"):
        secrets_dir()


def test_the_default_secrets_directory_is_used_only_when_it_exists(monkeypatch, tmp_path):
    monkeypatch.delenv("HIVEMESH_SECRETS_DIR", raising=False)
    monkeypatch.setattr(runtime_settings, "DEFAULT_SECRETS_DIR", tmp_path / "absent")
    assert secrets_dir() is None
    monkeypatch.setattr(runtime_settings, "DEFAULT_SECRETS_DIR", tmp_path)
    assert secrets_dir() == tmp_path
    monkeypatch.setenv("HIVEMESH_SECRETS_DIR", "")  # empty: as if unset
    assert secrets_dir() == tmp_path


def test_an_unknown_log_level_is_an_invalid_setting(monkeypatch):
    """Refused with the other settings (``serve`` exits 2), not once logging
    is set up; a level's name is taken in any case."""
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__LOG_LEVEL", "verbose")
    with pytest.raises(ValidationError):
        ArtifactSettings()
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__LOG_LEVEL", "")
    with pytest.raises(ValidationError):
        ArtifactSettings()
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__LOG_LEVEL", "debug")
    assert ArtifactSettings().server.log_level == "DEBUG"


@pytest.mark.parametrize("level", ["notset", "NOTSET", "warn", "fatal"])
def test_a_level_logging_knows_but_the_readme_does_not_list_is_an_invalid_setting(
        monkeypatch, level):
    """NOTSET would log every library's DEBUG lines; WARN and FATAL are
    aliases the README does not list."""
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__LOG_LEVEL", level)
    with pytest.raises(ValidationError, match="DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        ArtifactSettings()


def test_an_empty_host_is_an_invalid_setting(monkeypatch):
    """gRPC cannot bind an empty host (``:7001``): refused with the other
    settings (``serve`` exits 2), not once the server binds."""
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__HOST", "")
    with pytest.raises(ValidationError):
        ArtifactSettings()


@pytest.mark.parametrize("value", [" 127.0.0.1", "0.0.0.0\n", " "])
def test_a_padded_host_is_an_invalid_setting(monkeypatch, value):
    """As a padded health host: it would fail only at bind time."""
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__HOST", value)
    with pytest.raises(ValidationError, match="is not an address") as err:
        ArtifactSettings()
    assert err.value.errors()[0]["loc"] == ("server", "host")


def test_the_health_port_binds_the_service_s_host_unless_given_its_own(monkeypatch):
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__HOST", "127.0.0.1")
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__PORT", "8080")
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__HEALTH_PORT", "8081")
    server = ArtifactSettings().server
    assert server.health_host is None and server.health_bind_host == "127.0.0.1"
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__HEALTH_HOST", "0.0.0.0")
    server = ArtifactSettings().server
    assert (server.host, server.health_bind_host) == ("127.0.0.1", "0.0.0.0")


@pytest.mark.parametrize("value, problem", [
    ("", "at least 1 character"), (" 0.0.0.0", "is not an address"),
    ("0.0.0.0\n", "is not an address")])
def test_an_empty_or_padded_health_host_is_an_invalid_setting(monkeypatch, value, problem):
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__HEALTH_PORT", "8081")
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__HEALTH_HOST", value)
    with pytest.raises(ValidationError, match=problem) as err:
        ArtifactSettings()
    assert err.value.errors()[0]["loc"] == ("server", "health_host")


def test_a_health_host_without_a_health_port_is_an_invalid_setting(monkeypatch):
    # It would bind nothing while looking configured.
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__HEALTH_HOST", "0.0.0.0")
    with pytest.raises(ValidationError, match="health_host needs health_port"):
        ArtifactSettings()



@pytest.mark.parametrize("service", ["artifact", "information", "memory", "orchestrator"])
def test_an_empty_data_dir_is_an_invalid_setting(monkeypatch, service):
    """Set but empty it names nothing; read as "." it would put the
    service's files in whatever directory it was started from."""
    from hivemesh.cli.main import _service, main  # noqa: PLC0415
    settings_cls = _service(service)[0]
    monkeypatch.setenv(f"HIVEMESH_{service.upper()}_DATA_DIR", "")
    with pytest.raises(ValidationError) as err:
        settings_cls()
    assert err.value.errors()[0]["loc"] == ("data_dir",)
    monkeypatch.delenv(f"HIVEMESH_{service.upper()}_DATA_DIR")
    with pytest.raises(SystemExit) as exited:  # argparse: usage error
        main(["serve", service, "--data-dir", ""])
    assert exited.value.code == 2


def test_a_message_limit_must_leave_answers_room_beyond_their_margin(monkeypatch):
    """Answers keep 64 KiB of the limit for their status and headers: a
    smaller limit would refuse every answer that carries anything."""
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__MAX_MESSAGE_BYTES", "65536")
    with pytest.raises(ValidationError):
        ArtifactSettings()
    monkeypatch.setenv("HIVEMESH_ARTIFACT_SERVER__MAX_MESSAGE_BYTES", str(128 * 1024))
    assert ArtifactSettings().server.max_message_bytes == 128 * 1024


def test_a_price_beyond_any_real_one_fails_at_start_naming_the_setting(monkeypatch):
    """usage x price would overflow the int64 cost of a call: such a price
    is refused at start-up, not charged as an INTERNAL error later."""
    from hivemesh.services.information.pricing import MAX_PRICE_MICROS_PER_MILLION
    from hivemesh.services.information.settings import InformationSettings
    monkeypatch.setenv("HIVEMESH_INFORMATION_PRICES", (
        '{"gpt-x": {"input_micros_per_million": 9223372036854775807,'
        ' "output_micros_per_million": 8000000}}'))
    with pytest.raises(ValidationError) as err:
        InformationSettings()
    [problem] = err.value.errors()
    assert problem["loc"] == ("prices", "gpt-x", "input_micros_per_million")
    assert f"{MAX_PRICE_MICROS_PER_MILLION}" in problem["msg"]
    monkeypatch.delenv("HIVEMESH_INFORMATION_PRICES")
    monkeypatch.setenv("HIVEMESH_INFORMATION_DEFAULT_PRICE__OUTPUT_MICROS_PER_MILLION",
                       str(MAX_PRICE_MICROS_PER_MILLION + 1))
    monkeypatch.setenv("HIVEMESH_INFORMATION_DEFAULT_PRICE__INPUT_MICROS_PER_MILLION", "1")
    with pytest.raises(ValidationError) as err:
        InformationSettings()
    assert [e["loc"] for e in err.value.errors()] == [
        ("default_price", "output_micros_per_million")]
    monkeypatch.setenv("HIVEMESH_INFORMATION_DEFAULT_PRICE__OUTPUT_MICROS_PER_MILLION",
                       str(MAX_PRICE_MICROS_PER_MILLION))
    assert InformationSettings().default_price.output_micros_per_million == \
        MAX_PRICE_MICROS_PER_MILLION


def test_a_kubernetes_secret_volume_with_unrelated_files_is_read(tmp_path):
    """A Secret volume holds its keys behind ``..data`` and a timestamped
    directory, and may hold files that are no setting (a binary keystore,
    another service's keys): only the service's own files are read."""
    import warnings

    from hivemesh.services.orchestrator.settings import OrchestratorSettings
    stamped = tmp_path / "..2026_12_07_19_00_00.000000001"
    stamped.mkdir()
    (stamped / "HIVEMESH_ARTIFACT_POSTGRES_DSN").write_text("postgresql://app:s3cret@db/app\n")
    (stamped / "HIVEMESH_ORCHESTRATOR_TOOL_SERVERS").write_text('{"search": "tools:7000"}\n')
    (stamped / "keystore.p12").write_bytes(bytes(range(256)))
    (tmp_path / "..data").symlink_to(stamped.name)
    for entry in stamped.iterdir():
        (tmp_path / entry.name).symlink_to(f"..data/{entry.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dsn = ArtifactSettings(_secrets_dir=tmp_path).postgres_dsn
        servers = OrchestratorSettings(_secrets_dir=tmp_path).tool_servers
    assert dsn.get_secret_value() == "postgresql://app:s3cret@db/app"
    assert servers == {"search": "tools:7000"}


def test_a_setting_s_file_linking_out_of_the_secrets_directory_is_an_invalid_setting(
        tmp_path):
    """A link is followed only inside the directory; one that leads out (or
    nowhere) is refused naming the file, never passed over: a TLS file
    passed over would leave the service's port in plaintext."""
    from pydantic_settings import SettingsError
    secrets, elsewhere = tmp_path / "secrets", tmp_path / "elsewhere"
    secrets.mkdir()
    elsewhere.mkdir()
    (elsewhere / "cert.pem").write_text("not read\n")
    (secrets / "HIVEMESH_ARTIFACT_SERVER__TLS_CERT_FILE").symlink_to(elsewhere / "cert.pem")
    with pytest.raises(SettingsError) as err:
        ArtifactSettings(_secrets_dir=secrets)
    assert "HIVEMESH_ARTIFACT_SERVER__TLS_CERT_FILE" in str(err.value)
    assert "not read" not in str(err.value)
    (secrets / "HIVEMESH_ARTIFACT_SERVER__TLS_CERT_FILE").unlink()
    (secrets / "HIVEMESH_ARTIFACT_DEFAULT_PAGE_SIZE").symlink_to(secrets / "missing")
    with pytest.raises(SettingsError):
        ArtifactSettings(_secrets_dir=secrets)
    (secrets / "HIVEMESH_ARTIFACT_DEFAULT_PAGE_SIZE").unlink()
    # A key a volume projects to a nested path: a link to a directory
    # inside, no setting, passed over as before.
    nested = secrets / "..data" / "HIVEMESH_ARTIFACT_TLS"
    nested.mkdir(parents=True)
    (nested / "tls.crt").write_text("a certificate\n")
    (secrets / "HIVEMESH_ARTIFACT_TLS").symlink_to("..data/HIVEMESH_ARTIFACT_TLS")
    assert ArtifactSettings(_secrets_dir=secrets).server.tls_cert_file is None


def test_a_json_object_setting_in_the_environment_replaces_the_file_s(monkeypatch, tmp_path):
    """The environment wins over the secrets directory for a JSON object
    setting too: its value is the environment's, not the two merged (a
    tool server or a backend left out of the environment's is not used)."""
    from hivemesh.services.llm.settings import LlmSettings
    from hivemesh.services.orchestrator.settings import OrchestratorSettings
    (tmp_path / "HIVEMESH_ORCHESTRATOR_TOOL_SERVERS").write_text('{"old": "tools-a:7000"}\n')
    (tmp_path / "HIVEMESH_LLM_BACKENDS").write_text(
        '{"mock": {"type": "mock"}, "other": {"type": "mock"}}\n')
    assert OrchestratorSettings(_secrets_dir=tmp_path).tool_servers == {"old": "tools-a:7000"}
    monkeypatch.setenv("HIVEMESH_ORCHESTRATOR_TOOL_SERVERS", '{"new": "tools-b:7000"}')
    monkeypatch.setenv("HIVEMESH_LLM_BACKENDS", '{"mock": {"type": "mock"}}')
    assert OrchestratorSettings(_secrets_dir=tmp_path).tool_servers == {"new": "tools-b:7000"}
    assert set(LlmSettings(_secrets_dir=tmp_path).backends) == {"mock"}
    # Nested keys of one in the environment amend the file's.
    monkeypatch.delenv("HIVEMESH_LLM_BACKENDS")
    monkeypatch.setenv("HIVEMESH_LLM_BACKENDS__OTHER__REQUESTS_PER_MINUTE", "7")
    backends = LlmSettings(_secrets_dir=tmp_path).backends
    assert set(backends) == {"mock", "other"} and backends["other"].requests_per_minute == 7
    # Sections still combine: a nested setting from each place.
    monkeypatch.setenv("HIVEMESH_ORCHESTRATOR_SERVER__DRAIN_DELAY_S", "3")
    (tmp_path / "HIVEMESH_ORCHESTRATOR_SERVER__GRACE_PERIOD_S").write_text("4")
    server = OrchestratorSettings(_secrets_dir=tmp_path).server
    assert (server.drain_delay_s, server.grace_period_s) == (3, 4)


def test_a_file_holding_no_json_is_named_when_the_secrets_directory_is_a_link(tmp_path):
    """As /var/run/secrets/hivemesh on Debian images, /var/run a link to
    /run: the file is named in the directory as given."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "HIVEMESH_ARTIFACT_SERVER__TLS_CLIENT_NAMES").write_text("orchestrator.hivemesh.svc")
    link = tmp_path / "link"
    link.symlink_to(real)
    for secrets in (real, link):
        assert runtime_settings.variables_not_json(ArtifactSettings, {}, secrets) == [
            f"HIVEMESH_ARTIFACT_SERVER__TLS_CLIENT_NAMES in {secrets}"]


def test_the_variables_holding_no_json_for_a_list_or_object_setting_are_named():
    """What pydantic-settings' "error parsing value for field" is about:
    a list, mapping or section set to text that is not JSON, at any depth;
    scalars (read as text) and other services' variables are not."""
    from hivemesh.services.llm.settings import LlmSettings
    from hivemesh.services.orchestrator.settings import OrchestratorSettings
    environ = {
        "HIVEMESH_ARTIFACT_SERVER__TLS_CLIENT_NAMES": "orchestrator.hivemesh.svc",
        "HIVEMESH_ARTIFACT_SERVER__HOST": "0.0.0.0",  # a scalar: text, not JSON
        "hivemesh_artifact_server__tls_client_names_extra": "x",  # no such setting
        "HIVEMESH_ARTIFACT_MAX_CONTENT_BYTES": "8MiB",  # a scalar: pydantic says
        "HIVEMESH_LLM_MODELS": "[{",
        "HIVEMESH_ORCHESTRATOR_TOOL_SERVERS": '{"search": "127.0.0.1:1"}',  # fine
    }
    assert runtime_settings.variables_not_json(ArtifactSettings, environ) == [
        "HIVEMESH_ARTIFACT_SERVER__TLS_CLIENT_NAMES"]
    assert runtime_settings.variables_not_json(LlmSettings, environ) == ["HIVEMESH_LLM_MODELS"]
    assert runtime_settings.variables_not_json(OrchestratorSettings, environ) == []
    assert runtime_settings.variables_not_json(
        OrchestratorSettings, {"hivemesh_orchestrator_server": "{"}) == [
        "hivemesh_orchestrator_server"]
    # A section within a mapping of sections.
    from hivemesh.services.information.settings import InformationSettings
    assert runtime_settings.variables_not_json(
        InformationSettings, {"HIVEMESH_INFORMATION_PRICES__gpt-4o": "2.5 per million"}) == [
        "HIVEMESH_INFORMATION_PRICES__gpt-4o"]
