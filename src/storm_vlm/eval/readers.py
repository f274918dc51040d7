"""Readers for each benchmark's public on-disk layout, all producing `Record`s.

``load_benchmark(name, data_root)`` dispatches on the name. Each reader expects the
layout the benchmark's own release unpacks to (field names match the public files):

videomme
    ``DATA_ROOT/videomme/test-00000-of-00001.parquet`` (every ``*.parquet`` of
    ``DATA_ROOT/videomme``, else of ``DATA_ROOT``: all shards of a split) with columns ``videoID, question_id,
    duration (short/medium/long), domain, sub_category, task_type, question,
    options ["A. ...", ...], answer ("B")``; videos ``DATA_ROOT/data/{videoID}.mp4``
    (``.MP4`` and ``.mkv`` are also found).
mvbench
    ``DATA_ROOT/json/<task>.json`` (20 tasks), each a list of ``{video, question,
    candidates, answer (text), start?, end?}``; videos under ``DATA_ROOT/video/<folder>``
    with MVBench's own task -> folder table (e.g. action_sequence ->
    ``star/Charades_v1_480``, read between start and end; episodic_reasoning ->
    ``tvqa/frames_fps3_hq``, a folder of frames at 3 fps). The pre-cut folders of the
    lmms-eval mirror (``star/Charades_segment``, ``sta/sta_video_segment``,
    ``tvqa/video_fps3_hq_segment``, ``nturgbd_convert``, ``ssv2_video_mp4``) are used when
    the original is absent, without re-cutting. The folders may also sit directly
    under DATA_ROOT.
mlvu
    ``DATA_ROOT/json/{1_plotQA,2_needle,3_ego,4_count,5_order,6_anomaly_reco,
    7_topic_reasoning}.json`` (the multiple-choice tasks; ``DATA_ROOT/MLVU/json`` also
    works; the generation tasks ``8_sub_scene``/``9_summary`` are skipped with a warning),
    each a list of ``{video, duration, question, candidates, answer (text), question_type}``;
    videos ``DATA_ROOT/video/<task>/<video>``.
longvideobench
    ``DATA_ROOT/lvb_val.json``: a list of ``{id, video_path, question, candidates,
    correct_choice (int), duration_group, question_category, ...}``; videos
    ``DATA_ROOT/videos/<video_path>``.
egoschema
    ``DATA_ROOT/questions.json`` (``{q_uid, question, "option 0".."option 4"}``) and
    ``DATA_ROOT/subset_answers.json`` (``{q_uid: index}``); videos
    ``DATA_ROOT/videos/<q_uid>.mp4`` (or ``good_clips_git/``). Only the 500 questions whose
    answers are public are read: the rest can only be scored by the official server.
synthetic
    ``DATA_ROOT/test.json`` from ``storm-vlm synth``: ``{id, video (relative to DATA_ROOT),
    question, options ["A. ..."], answer ("B"), task}``.

A missing annotation file or a malformed record raises `StormError` naming the file
and the record (JSON files may start with a UTF-8 byte-order mark). For MVBench and MLVU, task
files that are absent while others are present are named in a warning: the mean over tasks then
covers fewer tasks than the benchmark's headline. A missing *video* is not an error here: it is
recorded as a decode failure when the run reaches it, so one absent file never stops a benchmark.

Annotation files are not trusted to stay inside the benchmark: every video path is resolved
and must lie inside the data root -- a `..`, an absolute path elsewhere or a symlink pointing out
of the root is a malformed record (`Record.video` holds the resolved path). Ids are non-empty
strings or integers; text fields hold no NUL or unpaired surrogate (they reach the tokenizer and
results.json); start/end are finite seconds in [0, MAX_SECONDS].
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

from storm_vlm.choices import LETTERS, strip_letter
from storm_vlm.data.records import MAX_SECONDS, check_text
from storm_vlm.errors import StormError
from storm_vlm.eval.records import Record

log = logging.getLogger("storm_vlm.eval")


class BenchmarkFormatError(StormError):
    """An annotation file is missing or one of its records is malformed."""


def _fail(path: Path, record: Any, cause: str) -> BenchmarkFormatError:
    where = f"{path}" if record is None else f"{path}, record {record}"
    return BenchmarkFormatError(f"{where}: {cause}")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise _fail(path, None, "file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark from a Windows editor is not content
            return json.load(f)
    except OSError as exc:
        raise _fail(path, None, f"cannot read ({exc})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise _fail(path, None, f"not valid JSON ({exc})") from None
    except RecursionError:
        raise _fail(path, None, "not valid JSON (nested deeper than Python's JSON parser allows)") from None


def _as_list(data: Any, path: Path) -> list:
    if not isinstance(data, list):
        raise _fail(path, None, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _field(row: Any, key: str, path: Path, rec: Any, kind: type | tuple = str) -> Any:
    if not isinstance(row, dict):
        raise _fail(path, rec, f"expected an object, got {type(row).__name__}")
    if key not in row or row[key] is None:
        raise _fail(path, rec, f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise _fail(path, rec, f"field {key!r} should be {_kind_name(kind)}, got {value!r}")
    return _clean(value, path, rec, f"field {key!r}") if isinstance(value, str) else value


def _kinds(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _clean(value: str, path: Path, rec: Any, what: str) -> str:
    """`value` unless it holds a NUL or an unpaired surrogate (BenchmarkFormatError naming the record)."""
    try:
        return check_text(value, "", what)
    except StormError as exc:
        raise _fail(path, rec, str(exc).removeprefix(": ")) from None


def _id(value: Any, path: Path, rec: Any, key: str = "id") -> str:
    """A record id: a non-empty string or an integer (a null, a bool, a list are malformed)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, rec, f"field {key!r} should be a non-empty string or an integer, got {value!r}")
    return _clean(value, path, rec, f"field {key!r}")


def _inside(root: Path, candidate: Path, path: Path, rec: Any) -> str:
    """`candidate` resolved, if it lies inside `root` (also resolved); BenchmarkFormatError naming
    the annotation file and record otherwise (a '..', an absolute path, a symlink out of the root)."""
    root = root.resolve()
    try:
        full = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise _fail(path, rec, f"video path {str(candidate)!r} cannot be resolved ({exc})") from None
    if full == root or not full.is_relative_to(root):
        raise _fail(path, rec, f"video path {str(candidate)!r} resolves to {str(full)!r}, outside the data root "
                               f"{str(root)!r} (a '..', an absolute path or a symlink out of the root is refused)")
    return str(full)


def _kind_name(kind: type | tuple) -> str:
    return " or ".join(k.__name__ for k in _kinds(kind))


def _options(values: Any, path: Path, rec: Any, key: str) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or len(values) < 2:
        raise _fail(path, rec, f"field {key!r} should be a list of at least 2 options, got {values!r}")
    if len(values) > len(LETTERS):
        raise _fail(path, rec, f"field {key!r} has {len(values)} options (at most {len(LETTERS)})")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise _fail(path, rec, f"option {i} of {key!r} is not a non-empty string: {v!r}")
        out.append(strip_letter(_clean(v, path, rec, f"option {i} of {key!r}"), i))
    return tuple(out)


def _letter_index(letter: Any, n: int, path: Path, rec: Any) -> int:
    if not isinstance(letter, str) or len(letter.strip()) != 1 or letter.strip().upper() not in LETTERS[:n]:
        raise _fail(path, rec, f"answer {letter!r} is not one of the letters {LETTERS[0]}-{LETTERS[n - 1]}")
    return LETTERS.index(letter.strip().upper())


def _text_index(answer: Any, options: tuple[str, ...], raw: list, path: Path, rec: Any) -> int:
    if not isinstance(answer, str):
        raise _fail(path, rec, f"answer {answer!r} is not a string")
    for i, (clean, given) in enumerate(zip(options, raw)):
        if answer == given or answer.strip() == clean:
            return i
    raise _fail(path, rec, f"answer {answer!r} is not one of the candidates {list(raw)!r}")


def _optional_float(row: dict, key: str, path: Path, rec: Any) -> float | None:
    """Seconds in [0, MAX_SECONDS] (numbers or numeric strings, as the releases have them), or None."""
    value = row.get(key)
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        seconds = float(value)
    except (TypeError, ValueError):
        raise _fail(path, rec, f"field {key!r} is not a number: {value!r}") from None
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS):
        raise _fail(path, rec, f"field {key!r} must be seconds between 0 and {MAX_SECONDS:g}, got {value!r}")
    return seconds


def _first_existing(candidates: list[Path]) -> Path:
    for p in candidates:
        if p.exists():
            return p
    return candidates[0]


def _rows_with_ids(path: Path):
    """(index, index and id for error messages, row) for each row of a JSON list file."""
    for i, row in enumerate(_as_list(_read_json(path), path)):
        yield i, (f"{i} (id {row.get('id')!r})" if isinstance(row, dict) else i), row


def _task_rows(json_dir: Path, tasks, benchmark: str):
    """(task, path, index, row, raw candidates, options) for each row of json/<task>.json of the tasks present."""
    present = [t for t in tasks if (json_dir / f"{t}.json").is_file()]
    if not present:
        raise _fail(json_dir / f"{tasks[0]}.json", None,
                    f"file not found (expected json/<task>.json for the {benchmark} tasks {list(tasks)})")
    absent = [t for t in tasks if t not in present]
    if absent:
        log.warning("%s: no %s in %s; the mean over tasks covers only the %d present, so it is not comparable "
                    "with a full run", benchmark, ", ".join(f"{t}.json" for t in absent), json_dir, len(present))
    for task in present:
        path = json_dir / f"{task}.json"
        for i, row in enumerate(_as_list(_read_json(path), path)):
            raw = _field(row, "candidates", path, i, list)
            yield task, path, i, row, raw, _options(raw, path, i, "candidates")


# ---------------------------------------------------------------- VideoMME

VIDEOMME_COLUMNS = ("videoID", "question_id", "duration", "domain", "sub_category",
                    "task_type", "question", "options", "answer")


def _videomme_parquets(root: Path) -> list[Path]:
    """Every ``*.parquet`` of the first of DATA_ROOT/videomme, DATA_ROOT that has any: a split the Hub
    stores as several shards (test-00000-of-00002, ...) is read whole, never just its first shard."""
    for folder in (root / "videomme", root):
        found = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if found:
            return found
    raise _fail(root / "videomme" / "test-00000-of-00001.parquet", None,
                "file not found (no *.parquet in the data root or its videomme/ folder)")


def _videomme_rows(root: Path):
    """(parquet file, row index in it, row) for every row of every shard, columns checked per file."""
    import pandas as pd

    for path in _videomme_parquets(root):
        try:
            table = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise _fail(path, None, f"cannot read parquet ({exc})") from None
        missing = [c for c in VIDEOMME_COLUMNS if c not in table.columns]
        if missing:
            raise _fail(path, None, f"missing columns {missing}")
        for i, row in enumerate(table.to_dict("records")):
            yield path, i, row


def read_videomme(root: Path) -> list[Record]:
    records = []
    for path, i, row in _videomme_rows(root):
        rec = f"{i} (question_id {row.get('question_id')!r})"
        raw = row["options"]
        raw = list(raw) if raw is not None and not isinstance(raw, str) else raw
        options = _options(raw, path, rec, "options")
        video_id = _field(row, "videoID", path, rec)
        video = _first_existing([root / "data" / f"{video_id}{s}" for s in (".mp4", ".MP4", ".mkv")])
        records.append(Record(
            id=_id(_field(row, "question_id", path, rec), path, rec, "question_id"),
            benchmark="videomme",
            video=_inside(root, video, path, rec),
            question=_field(row, "question", path, rec).strip(),
            options=options,
            answer=_letter_index(row["answer"], len(options), path, rec),
            categories={k: str(_field(row, k, path, rec)) for k in ("duration", "domain", "sub_category", "task_type")},
        ))
    return records


# ---------------------------------------------------------------- MVBench

# task -> folders to try in order: (folder, read start/end, frames fps if a frame folder).
# The first entry is MVBench's own table; later ones are pre-cut copies (bounds already applied).
MVBENCH_TASKS: dict[str, list[tuple[str, bool, float | None]]] = {
    "action_sequence": [("star/Charades_v1_480", True, None), ("star/Charades_segment", False, None)],
    "action_prediction": [("star/Charades_v1_480", True, None), ("star/Charades_segment", False, None)],
    "action_antonym": [("ssv2_video", False, None), ("ssv2_video_mp4", False, None)],
    "fine_grained_action": [("Moments_in_Time_Raw/videos", False, None)],
    "unexpected_action": [("FunQA_test/test", False, None)],
    "object_existence": [("clevrer/video_validation", False, None)],
    "object_interaction": [("star/Charades_v1_480", True, None), ("star/Charades_segment", False, None)],
    "object_shuffle": [("perception/videos", False, None)],
    "moving_direction": [("clevrer/video_validation", False, None)],
    "action_localization": [("sta/sta_video", True, None), ("sta/sta_video_segment", False, None)],
    "scene_transition": [("scene_qa/video", False, None)],
    "action_count": [("perception/videos", False, None)],
    "moving_count": [("clevrer/video_validation", False, None)],
    "moving_attribute": [("clevrer/video_validation", False, None)],
    "state_change": [("perception/videos", False, None)],
    "fine_grained_pose": [("nturgbd", False, None), ("nturgbd_convert", False, None)],
    "character_order": [("perception/videos", False, None)],
    "egocentric_navigation": [("vlnqa", False, None)],
    "episodic_reasoning": [("tvqa/frames_fps3_hq", True, 3.0), ("tvqa/video_fps3_hq_segment", False, None)],
    "counterfactual_inference": [("clevrer/video_validation", False, None)],
}


def _mvbench_video(root: Path, task: str, name: str) -> tuple[Path, bool, float | None]:
    for folder, bounded, fps in MVBENCH_TASKS[task]:
        for base in (root / "video", root, root / "video" / "data0613", root / "data0613"):
            names = [name] if fps is not None else [name, str(Path(name).with_suffix(".mp4"))]
            for n in dict.fromkeys(names):
                p = base / folder / n
                if p.exists():
                    return p, bounded, fps
    folder, bounded, fps = MVBENCH_TASKS[task][0]
    return root / "video" / folder / name, bounded, fps


def read_mvbench(root: Path, tasks: list[str] | None = None) -> list[Record]:
    records = []
    for task, path, i, row, raw, options in _task_rows(root / "json", tasks or list(MVBENCH_TASKS), "MVBench"):
        video, bounded, fps = _mvbench_video(root, task, _field(row, "video", path, i))
        records.append(Record(
            id=f"{task}/{i}",
            benchmark="mvbench",
            video=_inside(root, video, path, i),
            question=_field(row, "question", path, i).strip(),
            options=options,
            answer=_text_index(row.get("answer"), options, raw, path, i),
            start=_optional_float(row, "start", path, i) if bounded else None,
            end=_optional_float(row, "end", path, i) if bounded else None,
            categories={"task": task},
            frames_fps=fps,
        ))
    return records


# ---------------------------------------------------------------- MLVU

MLVU_TASKS = ("1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning")
# MLVU's open-ended tasks: no candidates, answers scored by a GPT judge (not supported here).
MLVU_GENERATION_TASKS = ("8_sub_scene", "9_summary")


def read_mlvu(root: Path) -> list[Record]:
    data_root = root
    if not (root / "json").is_dir() and (root / "MLVU" / "json").is_dir():
        root = root / "MLVU"
    generation = [root / "json" / f"{t}.json" for t in MLVU_GENERATION_TASKS if (root / "json" / f"{t}.json").is_file()]
    if generation and not any((root / "json" / f"{t}.json").is_file() for t in MLVU_TASKS):
        raise _fail(generation[0], None, "an MLVU generation task (open-ended answers scored by an LLM judge), which "
                                         f"is not supported; only the multiple-choice tasks {list(MLVU_TASKS)} are read")
    for path in generation:
        log.warning("MLVU: skipping %s, a generation task (open-ended answers scored by an LLM judge, not supported); "
                    "M-Avg is over the multiple-choice tasks", path)
    records = []
    for task, path, i, row, raw, options in _task_rows(root / "json", MLVU_TASKS, "MLVU"):
        qtype = row.get("question_type") or task.split("_", 1)[1]
        records.append(Record(
            id=f"{task}/{i}",
            benchmark="mlvu",
            video=_inside(data_root, root / "video" / task / _field(row, "video", path, i), path, i),
            question=_field(row, "question", path, i).strip(),
            options=options,
            answer=_text_index(row.get("answer"), options, raw, path, i),
            categories={"question_type": str(qtype), "task": task},
        ))
    return records


# ---------------------------------------------------------------- LongVideoBench


def read_longvideobench(root: Path) -> list[Record]:
    path = root / "lvb_val.json"
    records = []
    for i, rec, row in _rows_with_ids(path):
        if isinstance(row, dict) and "candidates" not in row and "option0" in row:
            raw = [row[f"option{k}"] for k in range(5) if row.get(f"option{k}") not in (None, "N/A")]
        else:
            raw = _field(row, "candidates", path, rec, list)
        options = _options(raw, path, rec, "candidates")
        answer = _field(row, "correct_choice", path, rec, int)
        if isinstance(answer, bool) or not 0 <= answer < len(options):
            raise _fail(path, rec, f"correct_choice {answer!r} is outside 0..{len(options) - 1}")
        records.append(Record(
            id=_id(row.get("id", i), path, rec),
            benchmark="longvideobench",
            video=_inside(root, root / "videos" / _field(row, "video_path", path, rec), path, rec),
            question=_field(row, "question", path, rec).strip(),
            options=options,
            answer=answer,
            categories={
                "duration_group": str(_field(row, "duration_group", path, rec, (int, float, str))),
                "question_category": str(_field(row, "question_category", path, rec)),
            },
        ))
    return records


# ---------------------------------------------------------------- EgoSchema


def read_egoschema(root: Path) -> list[Record]:
    qpath, apath = root / "questions.json", root / "subset_answers.json"
    questions = _as_list(_read_json(qpath), qpath)
    answers = _read_json(apath)
    if not isinstance(answers, dict):
        raise _fail(apath, None, f"expected a JSON object {{q_uid: answer index}}, got {type(answers).__name__}")
    records = []
    for i, row in enumerate(questions):
        uid = _field(row, "q_uid", qpath, i)
        if uid not in answers:
            continue
        rec = f"{i} (q_uid {uid!r})"
        raw = [_field(row, f"option {k}", qpath, rec) for k in range(5)]
        options = _options(raw, qpath, rec, "option 0..4")
        answer = answers[uid]
        if isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < 5:
            raise _fail(apath, f"q_uid {uid!r}", f"answer {answer!r} is not an index 0..4")
        video = _first_existing([root / d / f"{uid}{ext}" for d in ("videos", "good_clips_git", ".")
                                 for ext in (".mp4", ".MP4")])
        records.append(Record(
            id=_id(uid, qpath, rec, "q_uid"), benchmark="egoschema", video=_inside(root, video, qpath, rec),
            question=_field(row, "question", qpath, rec).strip(), options=options, answer=answer,
            categories={"subset": "subset"},
        ))
    missing = set(answers) - {r.id for r in records}
    if missing:
        raise _fail(apath, f"q_uid {sorted(missing)[0]!r}", f"{len(missing)} answered q_uid(s) have no question in {qpath}")
    return records


# ---------------------------------------------------------------- synthetic


def read_synthetic(root: Path) -> list[Record]:
    path = root / "test.json"
    records = []
    for i, rec, row in _rows_with_ids(path):
        options = _options(_field(row, "options", path, rec, list), path, rec, "options")
        records.append(Record(
            id=_id(_field(row, "id", path, rec, (str, int)), path, rec),
            benchmark="synthetic",
            video=_inside(root, root / _field(row, "video", path, rec), path, rec),
            question=_field(row, "question", path, rec).strip(),
            options=options,
            answer=_letter_index(row.get("answer"), len(options), path, rec),
            start=_optional_float(row, "start", path, rec),
            end=_optional_float(row, "end", path, rec),
            categories={"task": str(_field(row, "task", path, rec))},
        ))
    return records


READERS: dict[str, Callable[[Path], list[Record]]] = {
    "videomme": read_videomme,
    "mvbench": read_mvbench,
    "mlvu": read_mlvu,
    "longvideobench": read_longvideobench,
    "egoschema": read_egoschema,
    "synthetic": read_synthetic,
}


def load_benchmark(name: str, data_root: str | Path) -> list[Record]:
    """Read benchmark `name` from `data_root` into records (see the module docstring)."""
    if name not in READERS:
        raise StormError(f"unknown benchmark {name!r}; choose one of {sorted(READERS)}")
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise StormError(f"data root {root} for benchmark {name!r} is not a folder")
    records = READERS[name](root)
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.id in seen:
            raise StormError(f"{name} in {root}: record {i} repeats the id {r.id!r} of record {seen[r.id]}")
        seen[r.id] = i
    return records
