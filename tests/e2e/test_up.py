"""The README's first command: ``hivemesh up`` starts the mesh, runs the
demonstration through it and stops every process."""

import re
import subprocess
import sys


def test_up_runs_the_demonstration_and_stops_everything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hivemesh.cli.main", "up",
                             "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for service in ("artifact", "information", "llm"):
        assert re.search(rf"{service}\s+listening on 127\.0\.0\.1:\d+", out)
    saved = re.findall(r"saved (art-[0-9a-f-]{36})\s+(\w+)", out)
    assert [kind for _, kind in saved] == ["code", "test", "review"]
    assert "replayed=True" in out
    assert "count: 3 artifacts, 1 review" in out
    charged = [int(c) for c in re.findall(r"charged (\d+) micros", out)]
    status = re.search(r"budget status: spent (\d+) of 500 micro-USD .* reserved (\d+)", out)
    assert status and int(status.group(1)) == sum(charged) and status.group(2) == "0"
    assert "by mock-small):\ndef solve" in out  # the code came from the LLM service
    assert out.rstrip().endswith("all services stopped")
    # The data stayed where it was asked to be.
    assert (tmp_path / "artifact" / "artifacts.sqlite3").exists()
    assert (tmp_path / "information" / "information.sqlite3").exists()
