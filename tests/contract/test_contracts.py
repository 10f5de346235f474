"""The generated contracts: importable by their curated names, carrying
their validation rules, and matching the protos (regenerated and compared)."""

import subprocess
import sys
from pathlib import Path

import protovalidate
import pytest

from hivemesh.artifact.v1 import ArtifactFilter, ListArtifactsRequest, SaveArtifactRequest
from hivemesh.common.v1 import StreamEnd, StreamOutcome

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_protos():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "protogen.py"), "check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _violations(msg) -> set[str]:
    return {v.proto.rule_id for v in protovalidate.collect_violations(msg)}


def test_save_request_rules():
    ok = SaveArtifactRequest(request_id="r", workflow_id="wf", agent_id="a",
                             artifact_type="monitoring_report", content="x")
    assert _violations(ok) == set()
    assert "string.min_len" in _violations(SaveArtifactRequest(workflow_id="wf", agent_id="a",
                                                               artifact_type="code"))
    assert "string.pattern" in _violations(SaveArtifactRequest(
        request_id="r", workflow_id="wf", agent_id="a", artifact_type="Code Review"))


@pytest.mark.parametrize("size,valid", [(0, True), (1000, True), (1001, False), (-1, False)])
def test_page_size_range(size, valid):
    request = ListArtifactsRequest(filter=ArtifactFilter(), page_size=size)
    assert (_violations(request) == set()) is valid


def test_a_stream_end_must_say_how_the_stream_ended():
    assert _violations(StreamEnd()) == {"enum.not_in"}
    assert _violations(StreamEnd(outcome=StreamOutcome.STREAM_OUTCOME_COMPLETED)) == set()
