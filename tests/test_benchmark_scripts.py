"""Every benchmarks/*.py script loads (a renamed helper breaks `make bench` without failing any
other test): all are imported as modules in one subprocess; the scan and prefill scripts also run
at a tiny size."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_CONFIG

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_every_benchmark_script_imports():
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert "scan" in scripts and "prefill" in scripts
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1])\n"
            "for name in sys.argv[2:]: importlib.import_module(name)")
    done = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS), *scripts], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("script,argv,flag", [
    ("peers", ["--frames", "4,0"], "--frames"),
    ("peers", ["--frames", "a,b"], "--frames"),
    ("peers", ["--threads", "0"], "--threads"),
    ("decode", ["--frames", "-3"], "--frames"),
    ("prefill", ["--repeats", "0"], "--repeats"),
    ("prefill", ["--warmup", "-1"], "--warmup"),
    ("scan", ["--lengths", "x"], "--lengths"),
    ("video_loading", ["--frames", "0"], "--frames"),
    ("serve_throughput", ["--clients", "1,x"], "--clients"),
])
def test_benchmarks_reject_bad_counts_with_one_error(script, argv, flag, monkeypatch, capsys):
    """A count out of range or not a number is one argparse error naming the flag (exit 2), before any
    model is built, not a traceback from deep inside the run."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"error: argument {flag}: expected" in err, err[-2000:]


_BAD_CONFIGS = [(["--config", "{tmp}/missing.yaml"], "missing.yaml: cannot read"),
                (["--config", "{tmp}/bad.yaml"], "bad.yaml: not valid YAML")]


@pytest.mark.parametrize("script,argv,cause", [
    *((script, argv, cause) for script in ("prefill", "decode", "peers") for argv, cause in _BAD_CONFIGS),
    *((script, ["{tmp}/no-model"], "no-model does not exist")
      for script in ("prefill", "decode", "serve_throughput", "eval_reuse")),
    ("cost_model", ["--bench-config", "{tmp}/bad.yaml"], "bad.yaml: not valid YAML"),
])
def test_benchmarks_stop_on_a_bad_model_source_with_one_error(script, argv, cause, tmp_path, monkeypatch, capsys):
    """A config or model folder that cannot be used stops the script as the CLI stops: one line naming
    the file, exit 2, no traceback, before the process's threads or allocator change."""
    (tmp_path / "bad.yaml").write_text("model: [1\n")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    keep = [] if script == "cost_model" else ["--threads", str(torch.get_num_threads())]
    if script in ("prefill", "decode"):
        keep.append("--no-tune-malloc")
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).main([a.format(tmp=tmp_path) for a in argv] + keep)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith(f"{Path(sys.argv[0]).name}: error: ") and "\n" not in err, err
    assert cause in err and str(tmp_path) in err, err


def _run_scan(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "scan.py"), "--dims", "32", "--lengths", "64",
                           "--threads", "1", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr and "Error" not in done.stdout, done.stdout[-3000:]
    return done


@pytest.mark.slow
def test_scan_benchmark_floor_check_of_a_forced_path_runs_at_a_tiny_size():
    """`make bench`'s script on tiny shapes (its helpers run in subprocesses an import does not reach): a
    narrower kernel path is held to a floor timed with torch's kernels at that instruction set."""
    out = _run_scan("--floor-check-only", "--isa", "generic").stdout
    assert "fast/floor" in out and "generic x4 (torch DEFAULT)" in out, out[-2000:]


@pytest.mark.slow
def test_scan_benchmark_full_table_at_a_tiny_size(tmp_path):
    _run_scan("--json", str(tmp_path / "scan.json"))
    assert (tmp_path / "scan.json").is_file()


def test_prefill_benchmark_runs_on_a_tiny_model(tmp_path):
    """Its ratios, the vision rate each target needs and the choices it reports, on a tiny config."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": TINY_CONFIG, "profile": {"text_tokens": 4}}))
    done = subprocess.run([sys.executable, str(BENCHMARKS / "prefill.py"), "--config", str(config), "--repeats", "1",
                           "--warmup", "0", "--json", str(tmp_path / "prefill.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("the vision tower would need") + done.stdout.count("out of reach however fast") == 2
    report = json.loads((tmp_path / "prefill.json").read_text())
    ratios, met = report["ratios"], report["targets_met"]
    assert {"share_of_bound_128f_4x", "share_of_bound_128f_8x", "gflop_per_s_128f_none"} <= set(ratios)
    # the rate target is the products' (tower, LLM); the projector is held to its time share instead
    assert {"4x", "8x", "vision_tower_rate", "llm_prefill_rate"} <= set(met) and "projector_rate" not in met
    assert sorted(k for k in met if k.startswith("projector_share_")) == [
        f"projector_share_{f}f_{c}x" for f, c in ((128, 1), (128, 4), (128, 8), (32, 1), (32, 4))]
    # the reference product is re-timed after every timed round (one here) and each module set against it
    assert len(ratios["host_best_retimed_per_round"]) == 1 and ratios["host_best_retimed_per_round"][0] > 0
    within = ratios["share_of_host_best_within_round_128f_none"]
    rates, reference = ratios["gflop_per_s_128f_none"], ratios["host_best_retimed_per_round"][0]
    assert within == {m: pytest.approx(rate / reference, abs=2e-3) for m, rate in rates.items()}
    projector_line = next(line for line in done.stdout.splitlines() if "projector at 128 frames" in line)
    assert "no rate target" in projector_line and "MISSED" not in projector_line
    peak = ratios["fma_peak_gflop_per_s"]  # float32 here: the core's multiply-add peak, from the C kernels
    assert peak is None or peak > 0
    for factor in (4, 8):  # a needed tower rate is set against that peak
        needed = ratios.get(f"vision_gflop_per_s_needed_{factor}x")
        if needed is not None and peak:
            share = ratios[f"vision_need_share_of_fma_peak_{factor}x"]
            assert share == pytest.approx(needed / peak, abs=2e-3)
            assert f"{100 * share:.0f} % of the core's float32 multiply-add peak" in done.stdout
    assert "SigLIP layers timed" in done.stdout


def test_attention_benchmark_runs_at_bench_shapes():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "attention.py"), "--quick", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    if "no C kernels" in done.stdout:
        pytest.skip("no C compiler")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("vision", "LLM"))]
    assert len(rows) == 11  # 5 attention shapes x (float32, bfloat16), 1 LayerNorm
    assert all(line.rstrip()[-1].isdigit() or line.rstrip().endswith("x") for line in rows)
