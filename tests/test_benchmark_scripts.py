"""Every benchmarks/*.py script loads (a renamed helper breaks `make bench` without failing any
other test): all are imported as modules, not run, in one subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_every_benchmark_script_imports():
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert "scan" in scripts and "prefill" in scripts
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1])\n"
            "for name in sys.argv[2:]: importlib.import_module(name)")
    done = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS), *scripts], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _run_scan(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "scan.py"), "--dims", "32", "--lengths", "64",
                           "--threads", "1", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr and "Error" not in done.stdout, done.stdout[-3000:]
    return done


def test_scan_benchmark_floor_check_runs_at_a_tiny_size():
    """`make bench`'s script on tiny shapes: its helpers run in subprocesses an import does not reach."""
    assert "fast/floor" in _run_scan("--floor-check-only").stdout


@pytest.mark.slow
def test_scan_benchmark_full_table_at_a_tiny_size(tmp_path):
    _run_scan("--json", str(tmp_path / "scan.json"))
    assert (tmp_path / "scan.json").is_file()
