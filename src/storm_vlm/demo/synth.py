"""The synthetic temporal-reasoning video benchmark: `generate_synthetic_benchmark`, `check_sample`.

Writes into OUT_DIR:
  videos/*.mp4   real H.264 (or MPEG-4 Part 2) files, one per question
  train.json     LLaVA conversations: {"id", "video", "task", "conversations": [human, gpt]}; the gpt
                 turn is the answer's letter ("B"), or with answers="text" its option's text ("red")
  test.json      evaluation records: {"id", "video", "question", "options", "answer", "task"}
  images/*.png + align.json   image-caption pairs (LLaVA format with "image") for the align stage
  meta.json      seed, counts, tasks, frames, size, fps, codec, answers ("letter" or "text")

Same seed, same arguments: same JSON files and same decoded frames. Answers are balanced
per task and split (each letter equally often, up to one when a group is not a multiple of
4). Videos are rendered and encoded in a process pool. test.json always holds the letter: the
evaluation reads a reply that names an option's text back to that option (`extract_choice`).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from storm_vlm.demo.synth_tasks import (
    LETTERS,
    MAX_FRAMES,
    MIN_FRAMES,
    PALETTE,
    QUESTIONS,
    RENDERERS,
    TASKS,
    recover_answer,
)
from storm_vlm.errors import StormError
from storm_vlm.utils import atomic_write_json

__all__ = ["generate_synthetic_benchmark", "check_sample", "read_all_frames", "validate_synth_args",
           "option_text_answers", "ANSWER_PROMPT", "ANSWER_FORMATS", "TASKS"]

ANSWER_PROMPT = "Answer with the option's letter from the given choices directly."
FORMAT_VERSION = 1
ANSWER_FORMATS = ("letter", "text")  # what train.json's assistant turns hold
SHAPES = ("square", "circle", "triangle")
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.25, 0.75), "bottom left": (0.75, 0.25),
             "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}


def validate_synth_args(num_videos, num_frames, size, seed, split=0.2, tasks=TASKS, num_images=0, fps=8,
                        names=None, answers="letter") -> list[str]:
    """Raise StormError naming the bad value; return the task list. `names` maps args to flag names."""
    names = names or {}

    def bad(key, value, why):
        raise StormError(f"{names.get(key, key)}={value!r}: {why}")

    def integer(value):
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not integer(num_videos) or num_videos < 1:
        bad("num_videos", num_videos, "must be an integer >= 1")
    if not integer(num_frames) or not MIN_FRAMES <= num_frames <= MAX_FRAMES:
        bad("num_frames", num_frames, f"must be an integer between {MIN_FRAMES} and {MAX_FRAMES}")
    if not integer(size) or not 32 <= size <= 512 or size % 8:
        bad("size", size, "must be a multiple of 8 between 32 and 512 pixels")
    if not integer(seed) or seed < 0:
        bad("seed", seed, "must be a non-negative integer")
    if not isinstance(split, (int, float)) or not 0.0 <= split < 1.0:
        bad("split", split, "must be the test fraction, in [0, 1)")
    if not integer(num_images) or num_images < 0:
        bad("num_images", num_images, "must be an integer >= 0")
    if not isinstance(fps, (int, float)) or not 1 <= fps <= 120:
        bad("fps", fps, "must be between 1 and 120")
    if answers not in ANSWER_FORMATS:
        bad("answers", answers, f"must be one of {', '.join(ANSWER_FORMATS)}")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown or len(set(tasks)) != len(tasks):
        bad("tasks", ",".join(map(str, tasks)), f"must be distinct names among {', '.join(TASKS)}")
    return tasks


# ------------------------------------------------------------------ planning


def _plan(num_videos: int, seed: int, split: float, tasks: list[str]) -> list[dict]:
    """One entry per video: id, task, split, answer letter. Balanced letters per (task, split)."""
    rng = np.random.default_rng([seed, 0])
    by_task = {t: [i for i in range(num_videos) if tasks[i % len(tasks)] == t] for t in tasks}
    plan = [None] * num_videos
    for task, ids in by_task.items():
        n_test = int(round(len(ids) * split))
        test_ids = set(int(i) for i in rng.permutation(ids)[:n_test]) if n_test else set()
        for part in ("train", "test"):
            group = [i for i in ids if (i in test_ids) == (part == "test")]
            offset = int(rng.integers(4))  # which letters get the extra ones in a partial cycle
            letters = [LETTERS[(j + offset) % 4] for j in range(len(group))]
            for i, letter in zip(group, rng.permutation(letters) if group else []):
                plan[i] = {"index": i, "id": f"{task}_{i:05d}", "task": task, "split": part, "answer": str(letter)}
    return plan


# ------------------------------------------------------------------ encoding


def pick_codec(codec: str | None) -> str:
    for name in ([codec] if codec else ["libx264", "mpeg4"]):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise StormError(f"codec={codec!r}: no such video encoder in this PyAV/FFmpeg build")


def write_mp4(path: str, frames: np.ndarray, fps: float, codec: str) -> None:
    """Encode (T, S, S, 3) uint8 RGB frames to an mp4 file, atomically."""
    tmp = f"{path}.tmp"
    with av.open(tmp, "w", format="mp4") as container:
        if codec == "libx264":
            # crf 16 keeps the palette colours within a few levels; one thread keeps output identical.
            options = {"crf": "16", "preset": "ultrafast", "threads": "1", "g": "32"}
        else:
            options = {"g": "32"}
        stream = container.add_stream(codec, rate=int(round(fps)) if float(fps).is_integer() else fps,
                                      options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec != "libx264":
            stream.bit_rate = 4_000_000  # near-lossless at these sizes
        stream.thread_count = 1
        for t, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def read_all_frames(path: str) -> np.ndarray:
    """Every frame of a video as (T, H, W, 3) uint8, decoded in order (independent of load_video)."""
    reformatter = VideoReformatter()
    with av.open(str(path)) as container:
        frames = [reformatter.reformat(f, format="rgb24").to_ndarray() for f in container.decode(video=0)]
    return np.stack(frames)


def _make_video(job: dict) -> dict:
    """Worker: render one video, write it, return its record fields."""
    rng = np.random.default_rng([job["seed"], 1, job["index"]])
    rendered = RENDERERS[job["task"]](rng, job["num_frames"], job["size"], job["answer"])
    write_mp4(job["path"], rendered.frames, job["fps"], job["codec"])
    return {"index": job["index"], "options": rendered.options, "answer": rendered.answer}


def _make_image(job: dict) -> dict:
    """Worker: draw one shape on a grey background, save PNG, return its caption."""
    rng = np.random.default_rng([job["seed"], 2, job["index"]])
    size = job["size"]
    colour, shape = str(rng.choice(list(PALETTE))), str(rng.choice(SHAPES))
    position = str(rng.choice(list(POSITIONS)))
    grey = int(rng.integers(30, 91))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    cy, cx = (f * size for f in POSITIONS[position])
    r = size * 0.16
    box = [cx - r, cy - r, cx + r, cy + r]
    fill = PALETTE[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    tmp = job["path"] + ".tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, job["path"])
    where = "in the centre" if position == "centre" else f"in the {position} corner"
    return {"index": job["index"], "caption": f"A {colour} {shape} {where} of a grey background."}


# ------------------------------------------------------------------ records


def _options_text(options: list[str]) -> list[str]:
    return [f"{letter}. {text}" for letter, text in zip(LETTERS, options)]


def human_prompt(question: str, options: list[str]) -> str:
    """The human turn: <video>, the question, lettered options and the answer instruction."""
    return "<video>\n" + question + "\n" + "\n".join(_options_text(options)) + "\n" + ANSWER_PROMPT


def option_text_answers(train_records: list[dict]) -> list[dict]:
    """train.json records with each assistant answer letter replaced by its option's text.

    "B" -> "red" when the prompt lists "B. red". A from-scratch 2-layer LLM learns "which colour
    did I see" in a few hundred steps, but not "which letter stands next to that colour"
    (measured: static task, 300 steps, letters stay at chance while option texts reach >90%).
    `extract_choice` reads an option's text back to the option, so evaluation is unchanged.
    """
    out = []
    for rec in train_records:
        human, gpt = rec["conversations"][0]["value"], rec["conversations"][1]["value"].strip()
        texts = {line[0]: line[3:].strip() for line in human.splitlines() if len(line) > 3 and line[1:3] == ". "}
        if gpt not in texts:
            raise StormError(f"training record {rec.get('id')!r}: answer {gpt!r} is not one of its options")
        out.append({**rec, "conversations": [rec["conversations"][0], {"from": "gpt", "value": texts[gpt]}]})
    return out


def _run(fn, jobs: list[dict], workers: int, desc: str) -> list[dict]:
    if workers <= 1 or len(jobs) < 16:
        return [fn(j) for j in tqdm(jobs, desc=desc, leave=False, disable=len(jobs) < 16)]
    # fork (as torch's DataLoader does) needs no `if __name__ == "__main__"` guard in the caller;
    # the workers only run numpy and PyAV.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context(method)) as pool:
        chunk = max(1, len(jobs) // (workers * 8))
        return list(tqdm(pool.map(fn, jobs, chunksize=chunk), total=len(jobs), desc=desc, leave=False))


def generate_synthetic_benchmark(out_dir, num_videos: int = 200, num_frames: int = 128, size: int = 64,
                                 seed: int = 0, split: float = 0.2, tasks=TASKS, num_images: int | None = None,
                                 fps: float = 8, workers: int | None = None, codec: str | None = None,
                                 answers: str = "letter") -> dict:
    """Write the synthetic benchmark into `out_dir` and return its meta dict (also meta.json).

    num_videos videos of num_frames (16..512) frames of size x size pixels, tasks cycled
    over the videos; `split` is the fraction of each task's videos held out for test.json
    (distinct videos from train.json). num_images image-caption pairs (default num_videos).
    workers: processes for rendering/encoding (default: the CPU count, at most 8).
    answers: what train.json's assistant turns say -- "letter" (the option's letter, "B") or
    "text" (the option's text, "red"; see `option_text_answers`). test.json is the same either way.
    """
    tasks = validate_synth_args(num_videos, num_frames, size, seed, split, tasks,
                                num_videos if num_images is None else num_images, fps, answers=answers)
    num_images = num_videos if num_images is None else num_images
    codec = pick_codec(codec)
    workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    out_dir = os.fspath(out_dir)
    for sub in ("videos", "images"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

    plan = _plan(num_videos, seed, split, tasks)
    jobs = [{**p, "seed": seed, "num_frames": num_frames, "size": size, "fps": fps, "codec": codec,
             "path": os.path.join(out_dir, "videos", f"{p['id']}.mp4")} for p in plan]
    image_jobs = [{"index": i, "seed": seed, "size": size, "path": os.path.join(out_dir, "images", f"img_{i:05d}.png")}
                  for i in range(num_images)]
    results = {r["index"]: r for r in _run(_make_video, jobs, workers, "synth videos")}
    captions = _run(_make_image, image_jobs, workers, "synth images")

    train, test = [], []
    for p in plan:
        r = results[p["index"]]
        assert r["answer"] == p["answer"]
        video = f"videos/{p['id']}.mp4"
        question = QUESTIONS[p["task"]]
        if p["split"] == "train":
            train.append({"id": p["id"], "video": video, "task": p["task"], "conversations": [
                {"from": "human", "value": human_prompt(question, r["options"])},
                {"from": "gpt", "value": p["answer"]}]})
        else:
            test.append({"id": p["id"], "video": video, "question": question,
                         "options": _options_text(r["options"]), "answer": p["answer"], "task": p["task"]})
    align = [{"id": f"img_{c['index']:05d}", "image": f"images/img_{c['index']:05d}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image briefly."},
        {"from": "gpt", "value": c["caption"]}]} for c in captions]
    if answers == "text":
        train = option_text_answers(train)

    counts = {t: {"train": sum(1 for p in plan if p["task"] == t and p["split"] == "train"),
                  "test": sum(1 for p in plan if p["task"] == t and p["split"] == "test")} for t in tasks}
    meta = {"format_version": FORMAT_VERSION, "seed": seed, "num_videos": num_videos, "num_train": len(train),
            "num_test": len(test), "num_images": num_images, "tasks": tasks, "task_counts": counts,
            "frames": num_frames, "size": size, "fps": fps, "codec": codec, "test_fraction": split,
            "answers": answers,
            "files": {"train": "train.json", "test": "test.json", "align": "align.json", "videos": "videos",
                      "images": "images"}}
    atomic_write_json(os.path.join(out_dir, "train.json"), train)
    atomic_write_json(os.path.join(out_dir, "test.json"), test)
    atomic_write_json(os.path.join(out_dir, "align.json"), align)
    atomic_write_json(os.path.join(out_dir, "meta.json"), meta)  # last: its presence marks a complete set
    return meta


# ------------------------------------------------------------------ checking


def _record_fields(record: dict) -> tuple[str, list[str], str]:
    """(task, option texts, answer letter) from a test.json or a train.json record (either answers format)."""
    if "conversations" in record:
        human = record["conversations"][0]["value"]
        options = [line for line in human.splitlines() if line[:3] in {f"{L}. " for L in LETTERS}]
        answer = record["conversations"][1]["value"].strip()
        letter = {line[3:].strip(): line[0] for line in options}.get(answer)  # an option-text answer
        return record["task"], options, answer if letter is None or answer in LETTERS else letter
    return record["task"], list(record["options"]), record["answer"]


def check_sample(video_path, record: dict) -> bool:
    """Decode every frame of `video_path` and check that they show `record`'s answer."""
    task, options, answer = _record_fields(record)
    return recover_answer(read_all_frames(video_path), task, options) == answer
