"""`run_demo`: synthetic data -> 5 trained variants x seeds -> every row evaluated -> claims with
verdicts, rows with confidence intervals, chart, example.

Layout of the output folder (default runs/demo):

    settings.json            the DemoSettings + seeds of this folder (a rerun must match)
    data/                    the synthetic benchmark (train.json, test.json, videos/)
    models/<variant>/final   trained models (seed 0); models/<variant>-seed<k>/final for k > 0
    eval/seed<k>/<row>/      predictions.jsonl + results.json of each row
    results.json             claims, rows, settings, timings, and every (row, seed, question)'s correctness
    results.md, results.png  the claims table, the rows table; the rows with their error bars

Reruns reuse what is finished: the data when meta.json matches, a model when its
training_summary.json holds the same training config, and evaluation rows through the
evaluator's own resume (ids already in predictions.jsonl are skipped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from storm_vlm.demo import phases
from storm_vlm.demo.report import (CHANCE, build_claims, build_rows, claims_markdown, format_console, plot,
                                   rows_markdown, scope_tasks)
from storm_vlm.demo.settings import ROWS, VARIANTS, DemoSettings
from storm_vlm.errors import StormError
from storm_vlm.eval.prompts import build_prompt
from storm_vlm.utils import atomic_write_json, atomic_write_text, check_int

# Longest trainings first, so two workers finish together.
_SCHEDULE = ("storm_pool4", "storm_causal_pool4", "vila_pool4", "storm", "vila")
_OWNED = ("data", "models", "eval", "settings.json", "results.json", "results.md", "results.png")


def model_dir(output: Path, variant: str, seed: int) -> Path:
    """Where a variant's training run lives (its model is the `final/` inside)."""
    name = variant if seed == 0 else f"{variant}-seed{seed}"
    return Path(output) / "models" / name


def _quiet() -> None:
    """Silence library chatter (warnings, transformers' progress bars) for the rest of a worker process."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("storm_vlm").setLevel(logging.ERROR)


@contextlib.contextmanager
def _quiet_here():
    """`_quiet` for the calling process, restoring every setting it changes on exit."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    logger = logging.getLogger("storm_vlm")
    level = logger.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            logger.setLevel(level)


def _worker_init(threads: int) -> None:
    _quiet()
    torch.set_num_threads(max(1, threads))


def _count_lines(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        try:
            with open(p, "rb") as f:
                n += sum(1 for _ in f)
        except OSError:
            pass
    return n


class _Poller:
    """Updates a tqdm bar from `poll()` every half second on a background thread."""

    def __init__(self, bar, poll: Callable[[], int]):
        self.bar, self.poll = bar, poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _update(self) -> None:
        n = min(self.poll(), self.bar.total)
        if n != self.bar.n:
            self.bar.n = n
            self.bar.refresh()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._update()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._update()


def _run_jobs(fn, specs: list[dict], jobs: int, threads: int) -> list:
    """fn(spec) for every spec: in this process when jobs == 1, else in `jobs` spawned workers."""
    if jobs <= 1 or len(specs) <= 1:
        return [fn(s) for s in specs]
    with ProcessPoolExecutor(max_workers=min(jobs, len(specs)), mp_context=get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, s) for s in specs]
        wait(futures)
        return [f.result() for f in futures]


def _check_folder(output: Path, record: dict, fresh: bool) -> None:
    path = output / "settings.json"
    if fresh:
        for name in _OWNED:
            p = output / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return
    # settings this version no longer has (they changed nothing the folder holds) are not compared
    diff = [k for k in sorted(record["settings"]) if old["settings"].get(k) != record["settings"].get(k)]
    if diff:
        desc = "; ".join(f"{k}: {old['settings'].get(k)!r} before, {record['settings'].get(k)!r} now" for k in diff[:6])
        raise StormError(f"{output} holds a demo run with other settings ({desc}); "
                         "pass --fresh to start it over or choose another --output")


def run_demo(output: str | os.PathLike = "runs/demo", settings: DemoSettings | None = None, seeds: int = 3,
             jobs: int | None = None, threads: int = 1, fresh: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Run the whole demo; returns the results dict (also written to `output/results.json`).

    seeds: train every variant with training seeds 0..seeds-1 (same data); the intervals cover
    seeds and questions.
    jobs: worker processes for training/evaluation (default: CPU cores, at most 4); 1 runs
    everything in this process. threads: torch threads per job.
    """
    settings = (settings or DemoSettings.default()).validate()
    jobs = min(os.cpu_count() or 1, 4) if jobs is None else jobs
    for name, value in (("--seeds", seeds), ("--threads", threads), ("--jobs", jobs)):
        check_int(name, value, error=StormError)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    record = {"settings": settings.to_dict(), "seeds": seeds}
    _check_folder(output, record, fresh)
    atomic_write_json(output / "settings.json", record)

    with _quiet_here():
        return _run_phases(output, settings, seeds, jobs, threads, progress, log)


def _run_phases(output: Path, settings: DemoSettings, seeds: int, jobs: int, threads: int, progress: bool,
                log: Callable[[str], None]) -> dict:
    t_start, c_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    data_dir = output / "data"

    # 1. data ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    log(f"[1/4] synthetic benchmark -> {data_dir}")
    meta = phases.make_data(data_dir, settings, workers=None if jobs > 1 else 1)
    tasks = list(meta["tasks"])
    timings["data_s"] = time.perf_counter() - t0

    # 2. training --------------------------------------------------------------------------------
    # 2. training and evaluation: each job trains one (variant, seed) and evaluates its rows, so
    # both workers stay busy until the end ----------------------------------------------------------
    t0 = time.perf_counter()
    order = {name: i for i, name in enumerate(_SCHEDULE)}
    num_test = int(meta["num_test"])
    specs = []
    for s in range(seeds):
        for v in sorted(VARIANTS, key=lambda v: order[v.name]):
            run_dir = model_dir(output, v.name, s)
            specs.append({
                "settings": settings.to_dict(), "variant": v.name, "seed": s, "data_dir": str(data_dir),
                "output_dir": str(run_dir), "model_dir": str(run_dir / phases.FINAL),
                # the name recorded with the predictions: relative to the demo folder, so a moved or
                # copied folder still resumes its evaluations
                "model_name": str(run_dir.relative_to(output) / phases.FINAL),
                "eval_dir": str(output / "eval" / f"seed{s}"), "threads": threads})
    metric_files = [Path(s["output_dir"]) / "metrics.jsonl" for s in specs]
    pred_files = [Path(s["eval_dir"]) / row.name / "predictions.jsonl" for s in specs
                  for row in phases.rows_of(s["variant"])]
    log(f"[2/4] training {len(specs)} models ({settings.steps} steps each, batch {settings.batch_size}) and "
        f"evaluating {len(pred_files)} (model, setting) pairs on {num_test} held-out questions each "
        f"({jobs} parallel job(s) x {threads} thread(s))")
    with (tqdm(total=len(specs) * settings.steps, desc="train", unit="step", disable=not progress) as train_bar,
          tqdm(total=len(pred_files) * num_test, desc="eval ", unit="q", disable=not progress) as eval_bar,
          _Poller(train_bar, lambda: _count_lines(metric_files)), _Poller(eval_bar, lambda: _count_lines(pred_files))):
        done = _run_jobs(phases.train_and_evaluate, specs, jobs, threads)
    trained = [d["training"] for d in done]
    correctness: dict[str, dict] = {}
    tasks_of: dict[str, str] = {}
    tokens: dict[str, int] = {}
    empty: dict[str, int] = {}
    for spec, d in zip(specs, done):
        for row, r in d["rows"].items():
            correctness.setdefault(row, {})[spec["seed"]] = r["correct"]
            tasks_of.update(r["tasks_of"])
            tokens[row] = r["visual_tokens"]
            empty[row] = empty.get(row, 0) + r["replies"]["empty"]
    timings["train_eval_s"] = time.perf_counter() - t0

    # 3. latency (seed-0 models, one at a time so nothing else competes for the cores) ------------
    t0 = time.perf_counter()
    log(f"[3/4] prefill latency per row ({settings.latency_repeats} repeats, {threads} thread(s), median)")
    latency: dict[str, dict] = {}
    seed0 = [s for s in specs if s["seed"] == 0]
    old_threads = torch.get_num_threads()
    try:
        for spec in tqdm(seed0, desc="latency", unit="model", disable=not progress):
            latency.update(phases.latency_variant(spec))
    finally:
        torch.set_num_threads(old_threads)
    timings["latency_s"] = time.perf_counter() - t0

    # 4. report + example ------------------------------------------------------------------------
    rows = build_rows(settings, correctness, tasks_of, tokens, latency, tasks)
    claims = build_claims(correctness, tasks_of, tasks)
    best = max(rows, key=lambda r: r["accuracy"]["average"]["mean"])
    best_task = max(tasks, key=lambda t: best["accuracy"][t]["mean"])
    best_row = next(r for r in ROWS if r.name == best["row"])
    log(f"[4/4] example: {best['label']} answers the first held-out '{best_task}' question")
    example = phases.answer_example(model_dir(output, best["variant"], 0) / phases.FINAL, data_dir, settings,
                                    best_row, best_task)
    timings["total_s"] = time.perf_counter() - t_start
    timings["main_process_cpu_s"] = time.process_time() - c_start

    results = {
        "command": " ".join(["storm-vlm", *sys.argv[1:]]) if sys.argv and "storm" in Path(sys.argv[0]).name else None,
        "settings": settings.to_dict(),
        "seeds": list(range(seeds)),
        "jobs": jobs,
        "threads": threads,
        "tasks": tasks,
        "within_window_tasks": scope_tasks("within-window", tasks),
        "chance": CHANCE,
        "data": {"dir": str(data_dir), "num_train": meta["num_train"], "num_test": meta["num_test"],
                 "frames_per_video": meta["frames"], "size": meta["size"], "seed": meta["seed"]},
        "claims": claims,
        "rows": rows,
        "empty_replies": empty,
        "trainings": trained,
        "latency_note": "median wall time of one prefill forward (vision tower + projector + compression + "
                        f"LLM over the prompt), {settings.latency_repeats} repeats after a warm-up, "
                        f"{threads} torch thread(s), seed-0 model, first held-out video; preprocessing excluded",
        "example": example,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        # per (row, seed, question) correctness: every interval above can be recomputed from these
        "question_tasks": tasks_of,
        "correctness": {row: {str(seed): per for seed, per in by_seed.items()} for row, by_seed in correctness.items()},
    }
    atomic_write_json(output / "results.json", results)
    atomic_write_text(output / "results.md", _markdown(results, tasks, seeds))
    plot(rows, tasks, output / "results.png",
         f"storm-vlm demo: {meta['num_test']} held-out questions x {seeds} seed(s), "
         f"{settings.steps} training steps per model")

    log("")
    log(format_console(rows, claims, tasks))
    log(_example_text(example))
    log(_next_steps(output, settings, data_dir, best))
    log(f"results: {output / 'results.md'}, {output / 'results.json'}, {output / 'results.png'}")
    log(f"demo wall time: {timings['total_s'] / 60:.1f} min ({timings['total_s']:.0f} s; data {timings['data_s']:.0f}, "
        f"training + evaluation {timings['train_eval_s']:.0f}, latency {timings['latency_s']:.0f})")
    return results


def _example_text(ex: dict) -> str:
    lines = [f"Example (held-out video {ex['video']}, {ex['input_frames']} frames"
             + (f", sampling s={ex['temporal_sample_stride']}" if ex["temporal_sample_stride"] > 1 else "") + "):",
             f"  Q: {ex['question']}"]
    lines += [f"     {o}" for o in ex["options"]]
    verdict = "correct" if ex["correct"] else "wrong"
    lines.append(f"  model ({ex['row']}): {ex['reply']!r} -> {ex['predicted']}   truth: {ex['truth']}   ({verdict})")
    return "\n".join(lines) + "\n"


def _shell_quote(text: str) -> str:
    """Bash $'...' quoting (keeps newlines readable as \\n)."""
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _next_steps(output: Path, settings: DemoSettings, data_dir: Path, best: dict) -> str:
    """The chat / eval commands for the trained models (the best row's model and setting first)."""
    record = phases.load_test_records(data_dir, limit=1)[0]
    best_dir = model_dir(output, best["variant"], 0) / phases.FINAL
    sample = f" --temporal-sample {best['temporal_sample_stride']}" if best["temporal_sample_stride"] > 1 else ""
    storm = model_dir(output, "storm", 0) / phases.FINAL
    folders = ", ".join(str(model_dir(output, v.name, 0) / phases.FINAL) for v in VARIANTS)
    return (
        f"Trained models: {folders}\n"
        f"Ask the best one ({best['label']}) about a held-out video:\n"
        f"  storm-vlm chat {best_dir} {record.video} --frames {best['input_frames']}{sample} --dtype float32 "
        f"--max-new-tokens {settings.max_new_tokens} \\\n      -q {_shell_quote(build_prompt(record))}\n"
        f"Evaluate STORM on the held-out set with the standard harness:\n"
        f"  storm-vlm eval {storm} --benchmark synthetic --data-root {data_dir} --output {output / 'eval-cli' / 'storm'} "
        f"--frames {settings.base_frames} --max-new-tokens {settings.max_new_tokens}\n"
    )


def _markdown(results: dict, tasks: list[str], seeds: int) -> str:
    s = results["settings"]
    ex = results["example"]
    n_test = results["data"]["num_test"]
    verdicts = {}
    for c in results["claims"]:
        for sc in c["scopes"]:
            verdicts.setdefault(sc["verdict"], []).append(f"{c['claim']} ({sc['scope']})")
    summary = "; ".join(f"{v}: {', '.join(names)}" for v, names in sorted(verdicts.items()))
    head = (
        "# storm-vlm demo results\n\n"
        f"## The paper's claims\n\nGap = row A − row B in accuracy points over {seeds} training seed(s) and "
        f"{n_test} held-out questions, with a 95 % t interval over seeds and questions (docs/demo.md); "
        "verdict: *reproduced* when the CI lies above 0, *contradicted* when below, else *inconclusive*. "
        "Paper figures: arXiv 2503.04130v4 (MVBench / MLVU / LongVideoBench / VideoMME).\n\n"
        + claims_markdown(results["claims"]) + f"\n{summary}.\n\n"
        "## Rows\n\nAccuracy % with its 95 % CI (seeds and questions); *within-window* averages the tasks whose "
        "answer lives inside one pooling window; *seed std*: standard deviation of the average over seeds.\n\n"
        + rows_markdown(results["rows"], tasks)
    )
    setup = (
        f"\n## Set-up\n\nSynthetic benchmark: {results['data']['num_train']} training / {n_test} held-out videos "
        f"of {results['data']['frames_per_video']} frames at {results['data']['size']} px (data seed "
        f"{results['data']['seed']}); tasks: {', '.join(tasks)}; 4 options each, chance = 25 %.\n"
        f"Every model: tiny random-init SigLIP ({s['vision_layers']} layers, width {s['vision_hidden']}, "
        f"{s['patch_size']} px patches, frozen) + tiny Qwen2 LLM ({s['llm_layers']} layers, width {s['llm_hidden']}, "
        f"init std {s['llm_init_std']}), trained {s['steps']} steps x batch {s['batch_size']} (lr {s['learning_rate']}, "
        f"{s['lr_scheduler']} after {s['warmup_ratio']:.0%} warm-up; parts trained: {', '.join(s['train_parts'])}) "
        "to reply with the option's text, which `extract_choice` maps back to the option. Greedy generation; a reply "
        f"that names no option counts as wrong. Prefill latency: {results['latency_note']}.\n\n"
    )
    notes = "\n".join(f"- **{r['label']}**: trained on {r['trained_frames']} frames"
                      f"{', temporal pool k=' + str(r['temporal_pool']) if r['temporal_pool'] > 1 else ''}; "
                      f"evaluated on {r['input_frames']} frames"
                      f"{', test-time sampling s=' + str(r['temporal_sample_stride']) if r['temporal_sample_stride'] > 1 else ''}"
                      f" ({r['note']})." for r in results["rows"])
    example = (f"\n## Example\n\n{ex['question']}\n\n" + "\n".join(f"    {o}" for o in ex["options"])
               + f"\n\nModel ({ex['row']}) replied {ex['reply']!r} → {ex['predicted']}; truth {ex['truth']}.\n")
    t = results["timings_s"]
    timing = (f"\nWall time: {t['total_s']:.0f} s (data {t['data_s']:.0f}, training + evaluation "
              f"{t['train_eval_s']:.0f}, latency {t['latency_s']:.0f}).\n")
    return head + setup + notes + "\n" + example + timing
