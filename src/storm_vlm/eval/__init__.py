"""Video benchmark evaluation: readers, prompts, answer extraction, scoring, the resumable
runner and the lmms-eval plugin (`storm_vlm.eval.lmms_plugin`, needs the `lmms` extra).

The names below load on first use, so `storm_vlm.eval.readers` (what `storm-vlm eval --help`
lists) imports without torch.
"""

import importlib

_LAZY = {
    "extract_choice": "storm_vlm.choices",
    "ModelPredictor": "storm_vlm.eval.model_predictor",
    "evaluate": "storm_vlm.eval.model_predictor",
    "load_model": "storm_vlm.inference",
    "build_prompt": "storm_vlm.eval.prompts",
    "READERS": "storm_vlm.eval.readers",
    "BenchmarkFormatError": "storm_vlm.eval.readers",
    "load_benchmark": "storm_vlm.eval.readers",
    "Record": "storm_vlm.eval.records",
    "Predictor": "storm_vlm.eval.runner",
    "evaluate_with_predictor": "storm_vlm.eval.runner",
    "shard": "storm_vlm.eval.runner",
    "score": "storm_vlm.eval.scoring",
}

__all__ = ["BENCHMARKS", *_LAZY]


def __getattr__(name: str):
    if name == "BENCHMARKS":
        return tuple(importlib.import_module("storm_vlm.eval.readers").READERS)
    if name not in _LAZY:
        raise AttributeError(f"module 'storm_vlm.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
