"""Every package folder is listed in pyproject.toml, so wheels (and the
service containers built from them) are complete."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {name: (ROOT / folder) for name, folder in config["package-dir"].items()}
    expected = set()
    for base in set(mapping.values()):
        for init in base.rglob("__init__.py"):
            folder = init.parent
            # The most specific mapping owns a folder (services/runtime ->
            # hivemesh.runtime, not hivemesh.services.runtime).
            name, root = max(((n, r) for n, r in mapping.items() if folder.is_relative_to(r)),
                             key=lambda item: len(item[1].parts))
            expected.add(".".join((name, *folder.relative_to(root).parts)))
    listed = set(config["packages"])
    assert expected == listed, {"missing": sorted(expected - listed),
                                "stale": sorted(listed - expected)}


def test_the_typed_client_is_marked_typed():
    # PEP 561: without py.typed at the package root, type checkers ignore the
    # annotations of the installed client and the generated .pyi stubs.
    assert (ROOT / "clients/python/hivemesh/py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    assert "py.typed" in package_data["*"]


def test_pydantic_settings_is_required_recent_enough_for_nested_secrets():
    """The settings read the secrets directory with NestedSecretsSettingsSource,
    which pydantic-settings has had since 2.12: an older one would let every
    service fail at import."""
    import re
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"]
    [requirement] = [d for d in dependencies if re.match(r"pydantic-settings\b", d)]
    minimum = re.search(r">=\s*([0-9.]+)", requirement)
    assert minimum, requirement
    assert tuple(int(p) for p in minimum.group(1).split(".")) >= (2, 12), requirement
