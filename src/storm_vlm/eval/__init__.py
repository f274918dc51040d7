"""Video benchmark evaluation: readers, prompts, answer extraction, scoring, the resumable
runner and the lmms-eval plugin (`storm_vlm.eval.lmms_plugin`, needs the `lmms` extra)."""

from storm_vlm.choices import extract_choice
from storm_vlm.eval.model_predictor import ModelPredictor, evaluate
from storm_vlm.inference import load_model
from storm_vlm.eval.prompts import build_prompt
from storm_vlm.eval.readers import READERS, BenchmarkFormatError, load_benchmark
from storm_vlm.eval.records import Record
from storm_vlm.eval.runner import Predictor, evaluate_with_predictor, shard
from storm_vlm.eval.scoring import score

BENCHMARKS = tuple(READERS)

__all__ = [
    "BENCHMARKS", "BenchmarkFormatError", "ModelPredictor", "Predictor", "Record", "build_prompt",
    "evaluate", "evaluate_with_predictor", "extract_choice", "load_benchmark", "load_model", "score", "shard",
]
