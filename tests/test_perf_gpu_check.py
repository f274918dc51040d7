"""benchmarks/gpu_check.{sh,py}: the shell script parses, and the Python part runs every step in its
CPU dry-run mode (the GPU itself is checked where a device machine is lent)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402


def test_shell_script_parses():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_dry_run_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["host"]["cpu"]
    assert result["scan_vs_reference"]["ok"] and len(result["scan_vs_reference"]["cases"]) == 4
    assert result["bf16_train_step"]["ok"] and result["bf16_train_step"]["parameters_moved"] > 0
    assert result["nccl_2_process_step"]["skipped"] == "dry run"
    rows = result["profile"]["profile"]["rows"]
    assert [(r["frames"], r["compression"]) for r in rows] == [(f, c) for c in (1, 4, 8) for f in (2, 4)]


def test_without_cuda_it_says_so(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main(["--output", "/nonexistent/x.json"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
