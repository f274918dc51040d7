"""Every benchmarks/*.py script loads (a renamed helper breaks `make bench` without failing any
other test): all are imported as modules, not run, in one subprocess."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_every_benchmark_script_imports():
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert "scan" in scripts and "prefill" in scripts
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1])\n"
            "for name in sys.argv[2:]: importlib.import_module(name)")
    done = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS), *scripts], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
