"""Readers for each benchmark's public on-disk layout, all producing `Record`s.

``load_benchmark(name, data_root)`` dispatches on the name. Each reader expects the
layout the benchmark's own release unpacks to, or its Hugging Face Hub copy as
``huggingface-cli download --repo-type dataset REPO --local-dir DATA_ROOT`` leaves it with the
video archives extracted in place (field names match the public files):

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
    ``tvqa/frames_fps3_hq``, a folder of frames at 3 fps numbered from ``00001.jpg``, read over
    the same frames as MVBench's code: see `_tvqa_bounds`). The pre-cut folders of the
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
    Or, where there is no ``json/``, the Hub's MLVU-Dev (``sy1998/MLVU_dev``:
    ``DATA_ROOT/mlvu/test-00000-of-00001.parquet``) or MLVU-Test (``sy1998/MLVU_Test``:
    ``DATA_ROOT/mlvu_test/*.parquet``), columns ``video_name, question (the options may follow
    on their own lines, "(A) ..."; they are dropped from the question), candidates, answer
    (a letter, "A"), task_type``; videos ``DATA_ROOT/<video_name>``, where its
    ``video_part_*.zip`` archives extract.
    Or MLVU-Test as ``MLVU/MLVU_Test`` publishes it: ``DATA_ROOT/test-ground-truth/test_mcq_gt.json``,
    a list of ``{video, duration, question, candidates, answer (text), question_type, question_id}``
    (``test_multi_choice_tasks.json`` holds the same questions without answers and is not read);
    videos ``DATA_ROOT/MLVU_Test/video/<video>`` (where ``test_video.tar.gz.part-*`` extract) or
    ``DATA_ROOT/video/<video>``.
longvideobench
    ``DATA_ROOT/lvb_val.json``: a list of ``{id, video_path, question, candidates,
    correct_choice (int), duration_group, question_category, ...}`` (or ``option0..option4``,
    "N/A" where absent, instead of candidates); without it, the Hub's
    ``DATA_ROOT/validation-*.parquet`` with those columns (``option0..option4``); videos
    ``DATA_ROOT/videos/<video_path>`` (the extracted ``videos.tar.part.*``). The test split has no
    answers and is never read.
egoschema
    ``DATA_ROOT/questions.json`` (``{q_uid, question, "option 0".."option 4"}``) and
    ``DATA_ROOT/subset_answers.json`` (``{q_uid: index}``); without them, the Hub's
    ``lmms-lab/egoschema`` ``DATA_ROOT/Subset/test-*.parquet`` (columns ``video_idx, question,
    option ["A. ...", ...], answer (index 0-4)``). Videos ``DATA_ROOT/videos/<q_uid or
    video_idx>.mp4`` (where the Hub's ``videos_chunked_*.zip`` extract; or ``good_clips_git/``).
    Only the 500 questions whose answers are public are read: the rest can only be scored by
    the official server.
synthetic
    ``DATA_ROOT/test.json`` from ``storm-vlm synth``: ``{id, video (relative to DATA_ROOT),
    question, options ["A. ..."], answer ("B"), task}``.

A missing annotation file or a malformed record raises `StormError` naming the file
and the record (JSON files may start with a UTF-8 byte-order mark; in parquet files a null cell is a
missing field). For MVBench and MLVU, task files that are absent while others are present are named
in a warning: the mean over tasks then covers fewer tasks than the benchmark's headline. A missing *video* is not an error here: it is
recorded as a decode failure when the run reaches it, so one absent file never stops a benchmark.

Annotation files are not trusted to stay inside the benchmark: every video path is resolved
and must lie inside the data root -- a `..`, an absolute path elsewhere or a symlink pointing out
of the root is a malformed record (`Record.video` holds the resolved path), and so is an empty video
name. Ids are non-empty strings or integers; text fields hold no NUL or unpaired surrogate (they reach
the tokenizer and results.json); options and text answers given as JSON integers count as their text;
start/end are finite seconds in [0, MAX_SECONDS]. An annotation file larger than MAX_ANNOTATION_BYTES
is refused before it is read.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable

from storm_vlm.choices import LETTERS, strip_letter
from storm_vlm.data.records import MAX_SECONDS, check_text
from storm_vlm.errors import StormError
from storm_vlm.eval.records import Record

log = logging.getLogger("storm_vlm.eval")

# The largest annotation file of these benchmarks is a few MB; a file far larger is the wrong file,
# and reading it whole could exhaust memory before any error is said.
MAX_ANNOTATION_BYTES = 256 * 2**20


class BenchmarkFormatError(StormError):
    """An annotation file is missing or one of its records is malformed."""


def _fail(path: Path, record: Any, cause: str) -> BenchmarkFormatError:
    where = f"{path}" if record is None else f"{path}, record {record}"
    return BenchmarkFormatError(f"{where}: {cause}")


def _check_size(path: Path) -> None:
    """BenchmarkFormatError if `path` is larger than any annotation file (MAX_ANNOTATION_BYTES)."""
    size = path.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise _fail(path, None, f"{size} bytes, larger than the {MAX_ANNOTATION_BYTES} an annotation file may have "
                                "(is it the benchmark's annotation file?)")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise _fail(path, None, "file not found")
    _check_size(path)
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
        v = _number_text(v)
        if not isinstance(v, str) or not v.strip():
            raise _fail(path, rec, f"option {i} of {key!r} is not a non-empty string: {v!r}")
        out.append(strip_letter(_clean(v, path, rec, f"option {i} of {key!r}"), i))
    return tuple(out)


def _letter_index(letter: Any, n: int, path: Path, rec: Any) -> int:
    if not isinstance(letter, str) or len(letter.strip()) != 1 or letter.strip().upper() not in LETTERS[:n]:
        raise _fail(path, rec, f"answer {letter!r} is not one of the letters {LETTERS[0]}-{LETTERS[n - 1]}")
    return LETTERS.index(letter.strip().upper())


def _number_text(value: Any) -> Any:
    """An integer as its text ("3"), anything else as it is: counting questions may store their
    candidates or answer as JSON numbers, which the benchmarks' own code compares as text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _text_index(answer: Any, options: tuple[str, ...], raw: list, path: Path, rec: Any) -> int:
    answer = _number_text(answer)
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


def _video_field(row: Any, key: str, path: Path, rec: Any) -> str:
    """The video name in field `key`: a non-blank string (a blank one would name the video folder itself)."""
    name = _field(row, key, path, rec)
    if not name.strip():
        raise _fail(path, rec, f"field {key!r} is empty")
    return name


def _exists(path: Path) -> bool:
    """Whether `path` exists; False where it cannot even be looked up (a name too long, a folder without
    permission): the record is kept, and the run records why its video cannot be read."""
    try:
        return path.exists()
    except OSError:
        return False


def _first_existing(candidates: list[Path]) -> Path:
    for p in candidates:
        if _exists(p):
            return p
    return candidates[0]


def _rows_with_ids(path: Path, key: str = "id"):
    """(index, index and id (field `key`) for error messages, row) for each row of a JSON list file."""
    for i, row in enumerate(_as_list(_read_json(path), path)):
        yield i, (f"{i} ({key} {row.get(key)!r})" if isinstance(row, dict) else i), row


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


def _parquets(folders: list[Path], pattern: str = "*.parquet") -> list[Path]:
    """Every file matching `pattern` in the first of `folders` that has any, [] if none: a split the Hub
    stores as several shards (test-00000-of-00002, ...) is read whole, never just its first shard."""
    for folder in folders:
        found = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if found:
            return found
    return []


def _parquet_rows(paths: list[Path], columns: tuple[str, ...]):
    """(parquet file, row index in it, row) for every row of every file, `columns` checked per file. Cells
    come as the JSON readers' values: lists for arrays, Python numbers, None for a null (NaN, NA)."""
    import pandas as pd

    def plain(value: Any) -> Any:
        value = value.tolist() if hasattr(value, "tolist") else value  # numpy arrays and scalars
        return None if not isinstance(value, (list, dict)) and pd.isna(value) else value

    for path in paths:
        _check_size(path)
        try:
            table = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise _fail(path, None, f"cannot read parquet ({exc})") from None
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise _fail(path, None, f"missing columns {missing}")
        for i, row in enumerate(table.to_dict("records")):
            yield path, i, {k: plain(v) for k, v in row.items()}


def _index_answer(answer: Any, n: int, path: Path, rec: Any) -> int:
    """A 0-based answer index given as an integer or a string of digits (releases use both)."""
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < n:
        raise _fail(path, rec, f"answer {answer!r} is not an index 0..{n - 1}")
    return answer


# ---------------------------------------------------------------- VideoMME

VIDEOMME_COLUMNS = ("videoID", "question_id", "duration", "domain", "sub_category",
                    "task_type", "question", "options", "answer")


def read_videomme(root: Path) -> list[Record]:
    paths = _parquets([root / "videomme", root])
    if not paths:
        raise _fail(root / "videomme" / "test-00000-of-00001.parquet", None,
                    "file not found (no *.parquet in the data root or its videomme/ folder)")
    records = []
    for path, i, row in _parquet_rows(paths, VIDEOMME_COLUMNS):
        rec = f"{i} (question_id {row.get('question_id')!r})"
        options = _options(row["options"], path, rec, "options")
        video_id = _video_field(row, "videoID", path, rec)
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
    """Where `name` of `task` is, and whether its bounds apply and its frame rate: the first folder of the
    task's table holding it (a video also under its .mp4 name, as the pre-cut copies convert .webm/.avi)."""
    mp4 = str(Path(name).with_suffix(".mp4")) if Path(name).name else name
    for folder, bounded, fps in MVBENCH_TASKS[task]:
        for base in (root / "video", root, root / "video" / "data0613", root / "data0613"):
            for n in dict.fromkeys([name] if fps is not None else [name, mp4]):
                p = base / folder / n
                if _exists(p):
                    return p, bounded, fps
    folder, bounded, fps = MVBENCH_TASKS[task][0]
    return root / "video" / folder / name, bounded, fps


def _tvqa_bounds(start: float | None, end: float | None, fps: float) -> tuple[float | None, float | None]:
    """MVBench's bounds on a TVQA frame folder, moved onto the folder's own timeline.

    MVBench's reader numbers the frames from 1 (``00001.jpg`` is frame 1, at 1/fps s) and reads
    frames round(start * fps) .. round(end * fps); `load_frame_folder` puts the i-th image (from 0)
    at i/fps. So each bound becomes MVBench's frame number less one, over fps (rounded as MVBench
    rounds, so the same frames are read); the end gains a quarter frame, which rounds away but keeps
    a one-frame bound after its start. An empty bound (end <= start) stays as it is: the whole clip."""
    if start is not None and end is not None and end <= start:
        return start, end
    first = None if start is None else max(round(start * fps) - 1, 0) / fps
    last = None if end is None else (max(round(end * fps) - 1, 0) + 0.25) / fps
    return first, last


def read_mvbench(root: Path, tasks: list[str] | None = None) -> list[Record]:
    records = []
    for task, path, i, row, raw, options in _task_rows(root / "json", tasks or list(MVBENCH_TASKS), "MVBench"):
        video, bounded, fps = _mvbench_video(root, task, _video_field(row, "video", path, i))
        start, end = (_optional_float(row, k, path, i) if bounded else None for k in ("start", "end"))
        if fps is not None:
            start, end = _tvqa_bounds(start, end, fps)
        records.append(Record(
            id=f"{task}/{i}",
            benchmark="mvbench",
            video=_inside(root, video, path, i),
            question=_field(row, "question", path, i).strip(),
            options=options,
            answer=_text_index(row.get("answer"), options, raw, path, i),
            start=start,
            end=end,
            categories={"task": task},
            frames_fps=fps,
        ))
    return records


# ---------------------------------------------------------------- MLVU

MLVU_TASKS = ("1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning")
# MLVU's open-ended tasks: no candidates, answers scored by a GPT judge (not supported here).
MLVU_GENERATION_TASKS = ("8_sub_scene", "9_summary")


# The Hub copies lmms-eval reads: sy1998/MLVU_dev (folder mlvu/) and sy1998/MLVU_Test (mlvu_test/).
MLVU_HUB_FOLDERS = ("mlvu", "mlvu_test")
MLVU_HUB_COLUMNS = ("video_name", "question", "candidates", "answer", "task_type")
# "(A) text" or "A. text": an option repeated on its own line after the question.
_OPTION_LINE = re.compile(r"[\(\[]?[A-Z][\)\].:]\s*(.*)")


def _question_stem(question: str, options: tuple[str, ...]) -> str:
    """`question` without the trailing lines that repeat its options (the Hub's MLVU puts them there for
    lmms-eval's prompt; here the options are asked once, in the shared prompt). Only lines whose text is
    one of the options go, so a question that merely ends in a lettered line keeps it."""
    lines = question.strip().splitlines()
    while len(lines) > 1:
        last = lines[-1].strip()
        option = _OPTION_LINE.fullmatch(last)
        if last and not (option and option.group(1).strip() in options):
            break
        lines.pop()
    return "\n".join(lines).strip()


def _read_mlvu_hub(root: Path, paths: list[Path]) -> list[Record]:
    """The Hub's MLVU parquet rows (see the module docstring); ids are task_type/n, n counting within it."""
    records, counts = [], {}
    for path, i, row in _parquet_rows(paths, MLVU_HUB_COLUMNS):
        options = _options(_field(row, "candidates", path, i, list), path, i, "candidates")
        task = _field(row, "task_type", path, i)
        counts[task] = counts.get(task, -1) + 1
        records.append(Record(
            id=f"{task}/{counts[task]}",
            benchmark="mlvu",
            video=_inside(root, root / _video_field(row, "video_name", path, i), path, i),
            question=_question_stem(_field(row, "question", path, i), options),
            options=options,
            answer=_letter_index(row["answer"], len(options), path, i),
            categories={"question_type": task},
        ))
    return records


# MLVU/MLVU_Test: the multiple-choice questions with their answers (test_multi_choice_tasks.json has none).
MLVU_TEST_ANSWERS = "test-ground-truth/test_mcq_gt.json"


def _read_mlvu_test(root: Path, path: Path) -> list[Record]:
    """MLVU-Test as MLVU/MLVU_Test publishes it (see the module docstring); ids are its question_ids."""
    records = []
    for i, rec, row in _rows_with_ids(path, "question_id"):
        raw = _field(row, "candidates", path, rec, list)
        options = _options(raw, path, rec, "candidates")
        name = _video_field(row, "video", path, rec)
        records.append(Record(
            id=_id(_field(row, "question_id", path, rec, (str, int)), path, rec, "question_id"),
            benchmark="mlvu",
            video=_inside(root, _first_existing([root / "MLVU_Test" / "video" / name, root / "video" / name]),
                          path, rec),
            question=_question_stem(_field(row, "question", path, rec), options),
            options=options,
            answer=_text_index(row.get("answer"), options, raw, path, rec),
            categories={"question_type": _field(row, "question_type", path, rec)},
        ))
    return records


def read_mlvu(root: Path) -> list[Record]:
    data_root = root
    if not (root / "json").is_dir() and not (root / "MLVU" / "json").is_dir():
        hub = [f for f in MLVU_HUB_FOLDERS if _parquets([root / f])]
        if len(hub) > 1:
            raise _fail(root, None, "holds both mlvu/ (MLVU-Dev) and mlvu_test/ (MLVU-Test) parquet files; "
                                    "point --data-root at one of the two downloads")
        if hub:
            return _read_mlvu_hub(root, _parquets([root / hub[0]]))
        if (root / MLVU_TEST_ANSWERS).is_file():
            return _read_mlvu_test(root, root / MLVU_TEST_ANSWERS)
        if (root / "test_multi_choice_tasks.json").is_file():
            raise _fail(root / MLVU_TEST_ANSWERS, None, "file not found: test_multi_choice_tasks.json beside it holds "
                                                        "MLVU-Test's questions without answers, which MLVU/MLVU_Test "
                                                        f"publishes in {MLVU_TEST_ANSWERS}")
        raise _fail(root / "json" / f"{MLVU_TASKS[0]}.json", None,
                    "file not found (expected json/<task>.json of MLVU's release, MLVU/MLVU_Test's "
                    f"{MLVU_TEST_ANSWERS}, or the Hub's mlvu/*.parquet of sy1998/MLVU_dev or mlvu_test/*.parquet "
                    "of sy1998/MLVU_Test)")
    if not (root / "json").is_dir():
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
            video=_inside(data_root, root / "video" / task / _video_field(row, "video", path, i), path, i),
            question=_field(row, "question", path, i).strip(),
            options=options,
            answer=_text_index(row.get("answer"), options, raw, path, i),
            categories={"question_type": str(qtype), "task": task},
        ))
    return records


# ---------------------------------------------------------------- LongVideoBench


LONGVIDEOBENCH_COLUMNS = ("id", "video_path", "question", "correct_choice", "duration_group",
                          "question_category", "option0", "option1")


def _longvideobench_rows(root: Path):
    """(annotation file, record label, row) from lvb_val.json, else from the Hub's validation-*.parquet."""
    path = root / "lvb_val.json"
    if path.is_file():
        for _, rec, row in _rows_with_ids(path):
            yield path, rec, row
        return
    paths = _parquets([root], "validation-*.parquet")  # never test-*: it has no answers
    if not paths:
        raise _fail(path, None, "file not found (nor the Hub's validation-*.parquet beside it; the test split, "
                                "lvb_test_wo_gt.json or test-*.parquet, has no answers and is never read)")
    for parquet, i, row in _parquet_rows(paths, LONGVIDEOBENCH_COLUMNS):
        yield parquet, f"{i} (id {row.get('id')!r})", row


def read_longvideobench(root: Path) -> list[Record]:
    records = []
    for i, (path, rec, row) in enumerate(_longvideobench_rows(root)):
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
            video=_inside(root, root / "videos" / _video_field(row, "video_path", path, rec), path, rec),
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

# lmms-lab/egoschema's Subset config: the 500 questions of subset_answers.json, with their answers.
EGOSCHEMA_HUB_COLUMNS = ("video_idx", "question", "option", "answer")


def _egoschema_video(root: Path, uid: str) -> Path:
    """Where EgoSchema's video `uid` is (videos/ of the Hub's zips or the release, good_clips_git/, the root)."""
    return _first_existing([root / d / f"{uid}{ext}" for d in ("videos", "good_clips_git", ".")
                            for ext in (".mp4", ".MP4")])


def _read_egoschema_hub(root: Path, paths: list[Path]) -> list[Record]:
    records = []
    for path, i, row in _parquet_rows(paths, EGOSCHEMA_HUB_COLUMNS):
        uid = _id(_field(row, "video_idx", path, i), path, i, "video_idx")
        rec = f"{i} (video_idx {uid!r})"
        options = _options(_field(row, "option", path, rec, list), path, rec, "option")
        records.append(Record(
            id=uid, benchmark="egoschema", video=_inside(root, _egoschema_video(root, uid), path, rec),
            question=_field(row, "question", path, rec).strip(), options=options,
            answer=_index_answer(row["answer"], len(options), path, rec), categories={"subset": "subset"},
        ))
    return records


def read_egoschema(root: Path) -> list[Record]:
    qpath, apath = root / "questions.json", root / "subset_answers.json"
    if not qpath.is_file() and not apath.is_file():
        hub = _parquets([root / "Subset"], "test-*.parquet")
        if hub:
            return _read_egoschema_hub(root, hub)
        raise _fail(qpath, None, "file not found (expected questions.json + subset_answers.json of EgoSchema's "
                                 "release, or the Hub's Subset/test-*.parquet of lmms-lab/egoschema)")
    questions = _as_list(_read_json(qpath), qpath)
    if not apath.is_file():
        raise _fail(apath, None, f"file not found (the answers of the 500-question subset; {qpath.name} alone has "
                                 "no answers: the full set is scored only by EgoSchema's own server)")
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
        records.append(Record(
            id=_id(uid, qpath, rec, "q_uid"), benchmark="egoschema",
            video=_inside(root, _egoschema_video(root, uid), qpath, rec),
            question=_field(row, "question", qpath, rec).strip(), options=options,
            answer=_index_answer(answers[uid], 5, apath, f"q_uid {uid!r}"), categories={"subset": "subset"},
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
            video=_inside(root, root / _video_field(row, "video", path, rec), path, rec),
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
