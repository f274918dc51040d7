"""The exact question text sent to the model for each benchmark.

Every benchmark is asked with `storm_vlm.choices.format_question` in the "default" style; MVBench
keeps its own release's framing ("mvbench" style). Decoding is greedy (`storm_vlm.inference.GREEDY`,
no repetition penalty),
at most ``max_new_tokens`` new tokens (default 16), and the reply is read with
`storm_vlm.choices.extract_choice`. `describe_prompt` is written into every results.json, so a
number can always be traced to the words that produced it.
"""

from __future__ import annotations

from storm_vlm.choices import POST_PROMPT, STYLES, format_question
from storm_vlm.eval.records import Record

# benchmark -> question style (benchmarks not listed use "default")
BENCHMARK_STYLES = {"mvbench": "mvbench"}


def build_prompt(record: Record) -> str:
    """The user text (without the video) for `record`."""
    return format_question(record.question, record.options, BENCHMARK_STYLES.get(record.benchmark, "default"))


def describe_prompt(benchmark: str) -> dict:
    template, line = STYLES[BENCHMARK_STYLES.get(benchmark, "default")]
    return {"template": template, "option_line": line, "post_prompt": POST_PROMPT}
