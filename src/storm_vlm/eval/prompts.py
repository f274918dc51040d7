"""The exact question text sent to the model for each benchmark.

Every benchmark is asked the same way: the video comes first in the user turn (the
processor's chat template puts the video placeholder there), then

    {question}
    A. {option 0}
    B. {option 1}
    ...
    Answer with the option's letter from the given choices directly.

MVBench keeps its own release's framing (as lmms-eval's mvbench task does):

    Question: {question}
    Options:
    (A) {option 0}
    (B) {option 1}
    ...
    Answer with the option's letter from the given choices directly.

Options are lettered A, B, C, ... in the order the benchmark lists them (letter prefixes
that came with them, as in VideoMME's "A. ...", are replaced, never doubled). Decoding is
greedy (``do_sample=False``), at most ``max_new_tokens`` new tokens (default 16), and the
reply is read with `storm_vlm.eval.extract_choice`. These templates are written into every
results.json, so a number can always be traced to the words that produced it.
"""

from __future__ import annotations

from storm_vlm.eval.records import LETTERS, Record

POST_PROMPT = "Answer with the option's letter from the given choices directly."

DEFAULT_TEMPLATE = "{question}\n{options}\n" + POST_PROMPT
MVBENCH_TEMPLATE = "Question: {question}\nOptions:\n{options}\n" + POST_PROMPT

# benchmark -> (template, option line format)
PROMPTS: dict[str, tuple[str, str]] = {
    "videomme": (DEFAULT_TEMPLATE, "{letter}. {text}"),
    "mvbench": (MVBENCH_TEMPLATE, "({letter}) {text}"),
    "mlvu": (DEFAULT_TEMPLATE, "{letter}. {text}"),
    "longvideobench": (DEFAULT_TEMPLATE, "{letter}. {text}"),
    "egoschema": (DEFAULT_TEMPLATE, "{letter}. {text}"),
    "synthetic": (DEFAULT_TEMPLATE, "{letter}. {text}"),
}

GENERATION = {"do_sample": False, "num_beams": 1}


def prompt_spec(benchmark: str) -> tuple[str, str]:
    return PROMPTS.get(benchmark, PROMPTS["synthetic"])


def build_prompt(record: Record) -> str:
    """The user text (without the video) for `record`."""
    template, line = prompt_spec(record.benchmark)
    options = "\n".join(line.format(letter=LETTERS[i], text=t) for i, t in enumerate(record.options))
    return template.format(question=record.question, options=options)


def build_messages(record: Record) -> list[dict]:
    """One user turn for the processor's chat template: the video, then the question."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_prompt(record)}]}]


def describe_prompt(benchmark: str) -> dict:
    template, line = prompt_spec(benchmark)
    return {"template": template, "option_line": line, "post_prompt": POST_PROMPT}
