"""The demo: STORM vs the VILA baseline on the synthetic temporal-reasoning benchmark, on CPU.

`run_demo(output, settings=DemoSettings.default(), seeds=1)` generates the benchmark, trains the
four variants (VILA, STORM, STORM + temporal pool 4, VILA + temporal pool 4) with the same data,
sizes, steps and seed at the same LLM token budget, evaluates every row of the table (including
test-time temporal sampling and raw-frame subsampling), measures prefill latency, and writes
results.json / results.md / results.png. `storm-vlm demo` is its command line.
"""

from storm_vlm.demo.runner import model_dir, run_demo
from storm_vlm.demo.settings import ROWS, VARIANTS, DemoSettings, Row, Variant

__all__ = ["run_demo", "model_dir", "DemoSettings", "ROWS", "VARIANTS", "Row", "Variant"]
