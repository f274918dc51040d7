"""Reading LLaVA-style training records (JSON array or JSONL) into validated `Conversation`s.

Accepted record (one JSON object):
    {"id": "...", "video": "rel/path.mp4" | "image": "rel/path.png" | "image": [paths] | neither
     (text-only), "conversations": [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt", ...}, ...]}
Roles: human/user, gpt/assistant (and an optional leading system turn). Turns alternate
user/assistant and end with an assistant turn; an assistant turn that opens the conversation
(ShareGPT-derived records do) is dropped, as LLaVA and LLaVA-NeXT drop it: nothing prompts it.
`"image"` may list several images (LLaVA-OneVision's multi-image records: one `<image>` per image,
in order); `"video"` may be a one-element list, and names a video file or a folder of its frames.
Optional `"start"`/`"end"` (seconds) cut a clip from a video file. A turn's one placeholder is
moved to the front of the turn (LCS-558K writes "...\n<image>"), as LLaVA-NeXT's
`preprocess_multimodal` does and as the model is asked at inference (the video first).

A media path is relative to `media_root` (an absolute path must still lie inside it); a path
that resolves outside the root (`..`, an absolute path elsewhere, a symlink pointing out) is
rejected with a StormError naming the record. A video record whose text has `<image>` and no
`<video>` (LLaVA-NeXT / LLaVA-Video-178K write every visual placeholder as `<image>`) reads that
`<image>` as the video's placeholder. When a record has media but no placeholder, one
`<image>\\n` per image / `<video>\\n` is put in front of the first user turn; placeholders that do
not match the media (a count other than the images', several videos, any in an assistant turn) are
an error.

Everything here is checked when the file is loaded, before any training step, and a malformed
record stops the run with one StormError naming `file:line` and the cause: JSON that does not
parse (or uses NaN/Infinity, or nests deeper than Python's parser allows), a line longer than
`MAX_LINE_BYTES`, text that is not UTF-8, a string holding a NUL character or an unpaired
surrogate, `start`/`end` that are not finite seconds in [0, MAX_SECONDS] with start < end.
Whether the media can be *read*, and whether the tokens fit `max_length`, is only known when a
sample is built: that is a skip, counted and logged by `storm_vlm.data.datasets`.

JSONL is read line by line (a multi-GB file is never held as one string); a JSON array is read
whole, then taken apart element by element so each record still gets its line number. A file whose
first character is `[` is a JSON array whatever its name says.

A `.yaml`/`.yml` training file is a LLaVA-NeXT data mixture (its `--data_path` format):
    datasets:
      - json_path: /data/LLaVA-Video-178K/0_30_s_academic_v0_1/0_30_s_academic_oe_v0_1_qa_processed.json
        sampling_strategy: "first:10%"     # all | first:N | end:N | random:N, N a count or a percentage
A relative `json_path` is relative to the yaml's folder. A percentage is rounded up (as LLaVA-NeXT
does); `random:N` picks with a fixed seed (LLaVA-NeXT's is unseeded), so every rank and every resumed
run reads the same records. Only the chosen records are validated; each keeps its own `file:line`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from storm_vlm.errors import StormError
from storm_vlm.utils import IMAGE_TOKEN, VIDEO_TOKEN, yaml_problem

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# One JSONL record is a conversation of a few KB; a line this long is a damaged file (or not JSONL),
# and reading it whole would only exhaust memory.
MAX_LINE_BYTES = 16 * 1024 * 1024
# Clip bounds above this many seconds (about 115 days) are no real video's: refused as malformed, so
# that seconds x frame rate stays a finite, exact number downstream.
MAX_SECONDS = 1e7
_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")
_MIXTURE_SUFFIXES = (".yaml", ".yml")
# A UTF-16/32 byte-order mark, or JSON's first character (a bracket or a blank) next to a NUL byte:
# what Windows tools (PowerShell's `>` and Out-File, Notepad's "Unicode") write.
_UTF16 = re.compile(rb"\xff\xfe|\xfe\xff|[\[{ \t\r\n]\x00|\x00[\[{ \t\r\n]")
_STRATEGY = re.compile(r"(first|end|random):(\d+)(%?)")


@dataclass
class Conversation:
    """One training example. `messages`: [{"role": "system"|"user"|"assistant", "content": str}]."""

    id: str
    messages: list[dict]
    where: str  # "file:line" (JSONL) or "file:line (record #i)" (JSON array), for messages
    images: list[Path] = field(default_factory=list)
    video: Path | None = None
    start: float | None = None
    end: float | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def modality(self) -> str:
        return "video" if self.video is not None else "image" if self.images else "text"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _decode(text: str, pos: int, where: str, path: Path | None = None) -> tuple[object, int]:
    """One JSON value starting at text[pos]; StormError naming `where` when it does not parse (with
    `path`, `text` is the whole file and a syntax error names the exact line of `path` instead)."""
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        at = where if path is None else f"{path}:{exc.lineno}"
        cut = ""
        if path is None and (exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")):
            # the JSONL line ends inside its record
            cut = ("; the line ends before its record does: JSONL holds one whole record per line "
                   "(a pretty-printed file must be one JSON array of records)")
        raise StormError(f"{at}: malformed JSON ({exc.msg} at column {exc.colno}){cut}") from None
    except RecursionError:
        raise StormError(f"{where}: JSON nested too deeply (deeper than Python's JSON parser allows)") from None
    except ValueError as exc:  # NaN / Infinity (_reject_constant)
        raise StormError(f"{where}: not standard JSON ({exc})") from None


def _iter_jsonl(path: Path, f):
    """Yield (where, obj) for each non-blank line of an open binary file."""
    lineno = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if raw.startswith(_BOM):  # on any line: JSONL files saved with a BOM are often joined with `cat`
            raw = raw[len(_BOM):]
        lineno += 1
        where = f"{path}:{lineno}"
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            raise StormError(f"{where}: line longer than {MAX_LINE_BYTES} bytes (a damaged file, or not JSONL)")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StormError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
        start = _WS.match(line).end()
        if start == len(line):
            continue
        obj, end = _decode(line, start, where)
        if _WS.match(line, end).end() != len(line):
            raise StormError(f"{where}: malformed JSON (extra data after the record at column {end + 1})")
        yield where, obj


def _utf8(path: Path, data: bytes) -> str:
    """The text of a file's bytes (a UTF-8 byte-order mark dropped); StormError naming the line otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise StormError(f"{path}:{line}: not UTF-8 text") from None


def _iter_json_array(path: Path, text: str):
    """Yield (where, obj) for each element of a JSON array, `where` naming its line and index."""
    pos = _WS.match(text).end() + 1  # past "["
    line, counted = 1, 0

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    pos = _WS.match(text, pos).end()
    index = 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            where = f"{path}:{line_at(pos)} (record #{index})"
            obj, pos = _decode(text, pos, where, path)
            yield where, obj
            index += 1
            pos = _WS.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            raise StormError(f"{path}:{line_at(pos)}: malformed JSON (expected ',' or ']' after record #{index - 1})")
    pos = _WS.match(text, pos).end()
    if pos != len(text):
        raise StormError(f"{path}:{line_at(pos)}: malformed JSON (extra data after the list of records)")


def _iter_raw(path: Path):
    """Yield (where, obj) for every record of a .json (array) or .jsonl file.

    A file is a JSON array when its first non-blank character is `[`, whatever its name (a record
    is an object, so no JSONL file starts so); anything else is read as JSONL (one record per line)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            while head.removeprefix(_BOM).strip() == b"" and (more := f.read(1 << 16)):
                head += more
            if _UTF16.match(head):
                raise StormError(f"{path}: UTF-16 or UTF-32 text (a training file is UTF-8, JSON's encoding); "
                                 "save it as UTF-8")
            if not head.removeprefix(_BOM).lstrip().startswith(b"["):
                f.seek(0)
                yield from _iter_jsonl(path, f)
                return
            text = _utf8(path, head + f.read())  # the bytes are freed here: a 2 GB file is held once, as text
    except OSError as exc:
        raise StormError(f"{path}: cannot read training file ({exc.strerror or exc})") from None
    # the whole array is decoded before any record is checked: a file that is not JSON is named as such
    yield from list(_iter_json_array(path, text))


def check_text(value: str, where: str, what: str) -> str:
    """`value` if it is text a tokenizer and the file system can take: no NUL, no unpaired surrogate."""
    if "\x00" in value:
        raise StormError(f"{where}: {what} holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StormError(f"{where}: {what} holds an unpaired surrogate (\\u{ord(value[exc.start]):04x})") from None
    return value


class MediaRoot:
    """The folder records' media paths are relative to; `resolve` refuses anything outside it.

    A path is resolved as its folder (each folder resolved once, then remembered: a training file
    names a few folders millions of times, and resolving every path component by component from the
    root cost several times more than parsing the file) plus its last component, which is resolved
    only when it is a symlink. The result is the path `Path.resolve()` gives: `..`, absolute paths
    and symlinks anywhere on the way count."""

    def __init__(self, folder: Path):
        self.root = folder.resolve()
        self._folders: dict[str, Path] = {}

    def _resolve(self, rel: str) -> Path:
        head, name = os.path.split(rel)
        if name in ("", ".", ".."):
            return (self.root / rel).resolve()
        folder = self._folders.get(head)
        if folder is None:
            folder = self._folders[head] = (self.root / head).resolve()
        full = folder / name
        return full.resolve() if os.path.islink(full) else full  # islink: False when lstat fails, as in resolve

    def resolve(self, rel, where: str, rid: str, key: str) -> Path:
        """The file `rel` names (a string, or a one-element list), inside the root; StormError naming
        the record otherwise."""
        if isinstance(rel, list):
            if len(rel) != 1:
                raise StormError(f"{where} (id {rid}): {key!r} lists {len(rel)} files; one per record is supported")
            rel = rel[0]
        if not isinstance(rel, str) or not rel:
            raise StormError(f"{where} (id {rid}): {key!r} must be a file path, got {rel!r}")
        check_text(rel, f"{where} (id {rid})", f"{key} path")
        try:
            full = self._resolve(rel)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise StormError(f"{where} (id {rid}): {key} path {rel!r} cannot be resolved ({exc})") from None
        if not full.is_relative_to(self.root):
            raise StormError(f"{where} (id {rid}): {key} path {rel!r} escapes the media root {str(self.root)!r}")
        if full == self.root:
            raise StormError(f"{where} (id {rid}): {key} path {rel!r} names the media root itself, not a file")
        return full


def _seconds(obj: dict, key: str, where: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise StormError(f"{where}: {key!r} must be seconds (a number), got {v!r}")
    if not (math.isfinite(v) and 0 <= v <= MAX_SECONDS):
        raise StormError(f"{where}: {key!r} must be seconds between 0 and {MAX_SECONDS:g}, got {v!r}")
    return float(v)


def _record_id(obj: dict, where: str, index: int) -> str:
    rid = obj.get("id")
    if rid is None:
        return str(index)
    if isinstance(rid, str) and rid:
        return check_text(rid, where, "'id'")
    if isinstance(rid, int) and not isinstance(rid, bool):
        return str(rid)
    raise StormError(f"{where}: 'id' must be a non-empty string or an integer, got {rid!r}")


def _parse_record(obj, where: str, media: MediaRoot, index: int) -> Conversation:
    if not isinstance(obj, dict):
        raise StormError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    rid = _record_id(obj, where, index)
    here = f"{where} (id {rid})"
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise StormError(f"{here}: 'conversations' must be a non-empty list")
    messages = []
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise StormError(f"{here}: turn {t} must be an object")
        raw_role = turn.get("from", turn.get("role"))
        role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
        value = turn.get("value", turn.get("content"))
        if role is None:
            raise StormError(f"{here}: turn {t} has unknown role {raw_role!r}")
        if not isinstance(value, str):
            raise StormError(f"{here}: turn {t} has no text 'value'")
        check_text(value, here, f"turn {t}")
        if role == "system" and t != 0:
            raise StormError(f"{here}: a system turn may only come first (turn {t})")
        messages.append({"role": role, "content": value})
    roles = " ".join(m["role"] for m in messages)  # as written, for the error below
    first = 1 if messages[0]["role"] == "system" else 0
    if messages[first:] and messages[first]["role"] == "assistant":
        del messages[first]  # an opening gpt turn answers nothing: LLaVA / LLaVA-NeXT drop it too
    body = messages[first:]
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or [m["role"] for m in body] != expected[: len(body)] or body[-1]["role"] != "assistant":
        raise StormError(f"{here}: turns must alternate human/gpt and end with a gpt turn (got: {roles})")

    image = obj.get("image")
    video = obj.get("video")
    if image is not None and video is not None:
        raise StormError(f"{here}: a record has either 'image' or 'video', not both")
    rec = Conversation(id=rid, messages=messages, where=where)
    if image is not None:
        paths = image if isinstance(image, list) else [image]
        if not paths:
            raise StormError(f"{here}: 'image' lists no files")
        rec.images = [media.resolve(p, where, rid, "image") for p in paths]
    if video is not None:
        rec.video = media.resolve(video, where, rid, "video")
        rec.start, rec.end = _seconds(obj, "start", here), _seconds(obj, "end", here)
        if rec.start is not None and rec.end is not None and rec.start >= rec.end:
            raise StormError(f"{here}: 'start' ({rec.start:g} s) must be before 'end' ({rec.end:g} s)")

    if rec.video is not None and not any(VIDEO_TOKEN in m["content"] for m in messages):
        # LLaVA-NeXT / LLaVA-Video-178K write the video's placeholder as "<image>" (their one visual token):
        # in a video record (which has no image) a lone "<image>" stands for the video.
        for m in messages:
            m["content"] = m["content"].replace(IMAGE_TOKEN, VIDEO_TOKEN)
    for placeholder, files in ((IMAGE_TOKEN, len(rec.images)), (VIDEO_TOKEN, int(rec.video is not None))):
        count = sum(m["content"].count(placeholder) for m in messages)
        in_user = sum(m["content"].count(placeholder) for m in messages if m["role"] == "user")
        if files:
            if count == 0:
                first_user = next(m for m in messages if m["role"] == "user")
                first_user["content"] = f"{placeholder}\n" * files + first_user["content"]
            elif count != files or in_user != files:
                outside = count - in_user
                where_found = f"{count}, {outside} of them outside human turns" if outside else str(count)
                raise StormError(f"{here}: {placeholder} must appear {files} time(s), once per file, in human "
                                 f"turns (found {where_found})")
        elif count:
            name = placeholder.strip("<>")
            raise StormError(f"{here}: text has {placeholder} but the record has no {name!r} file")
    for m in messages:  # a turn's one placeholder goes first, as LLaVA-NeXT's preprocess_multimodal puts it
        found = [p for p in (IMAGE_TOKEN, VIDEO_TOKEN) if p in m["content"]]
        if len(found) == 1 and m["content"].count(found[0]) == 1 and not m["content"].startswith(found[0]):
            m["content"] = f"{found[0]}\n" + m["content"].replace(found[0], "").strip()
    rec.extra = {k: v for k, v in obj.items() if k not in ("id", "image", "video", "conversations", "start", "end")}
    return rec


def _mixture(path: Path) -> list[tuple[Path, str]]:
    """(json file, sampling strategy) for each entry of a LLaVA-NeXT data yaml (see the module
    docstring), every entry checked before any file is read."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise StormError(f"{path}: cannot read training file ({exc})") from None
    except yaml.YAMLError as exc:
        raise StormError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    entries = doc.get("datasets") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise StormError(f"{path}: a data mixture needs a non-empty 'datasets' list of "
                         "{json_path, sampling_strategy} entries (LLaVA-NeXT's data yaml)")
    out = []
    for i, entry in enumerate(entries):
        at = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str) or not entry["json_path"]:
            raise StormError(f"{at}: needs a 'json_path' (the annotation file), got {entry!r}")
        unknown = sorted(set(entry) - {"json_path", "sampling_strategy"})
        if unknown:
            raise StormError(f"{at}: unknown key(s) {', '.join(map(repr, unknown))} "
                             "(an entry has json_path and sampling_strategy)")
        strategy = entry.get("sampling_strategy", "all")
        if not (strategy == "all" or isinstance(strategy, str) and _STRATEGY.fullmatch(strategy)):
            raise StormError(f"{at}: sampling_strategy must be all, first:N, end:N or random:N (N a count "
                             f"or a percentage such as 10%), got {strategy!r}")
        file = path.parent / entry["json_path"]
        if file.suffix.lower() in _MIXTURE_SUFFIXES:
            raise StormError(f"{at}: json_path {entry['json_path']!r} is a yaml; mixtures do not nest")
        if not file.is_file():
            raise StormError(f"{at}: json_path {str(file)!r} is not a file")
        out.append((file, strategy))
    return out


def _sample(raw: list, strategy: str) -> list:
    """The items of one file's records that `strategy` keeps, in file order (see the module docstring)."""
    if strategy == "all":
        return raw
    how, number, percent = _STRATEGY.fullmatch(strategy).groups()
    n = min(len(raw), math.ceil(int(number) * len(raw) / 100) if percent else int(number))
    if how == "first":
        return raw[:n]
    if how == "end":
        return raw[len(raw) - n:]
    return [raw[i] for i in sorted(random.Random(0).sample(range(len(raw)), n))]


def load_records(path: str | os.PathLike, media_root: str | os.PathLike) -> list[Conversation]:
    """Parse and validate every record of a LLaVA-style .json / .jsonl file, or of the files a
    LLaVA-NeXT data yaml names (no media is read).

    Any malformed record raises StormError naming `file:line` and the cause (see the module docstring).
    """
    path, media_root = Path(path), Path(media_root)
    if not media_root.is_dir():
        raise StormError(f"media_root {str(media_root)!r} is not a folder")
    if path.is_dir():
        raise StormError(f"{path}: is a folder, not a training file")
    if path.suffix.lower() in _MIXTURE_SUFFIXES:  # (index in its file, (where, obj)) for each chosen record
        chosen = (item for file, strategy in _mixture(path)
                  for item in _sample(list(enumerate(_iter_raw(file))), strategy))
    else:
        chosen = enumerate(_iter_raw(path))
    media = MediaRoot(media_root)
    records = [_parse_record(obj, where, media, i) for i, (where, obj) in chosen]
    if not records:
        raise StormError(f"{path}: no training records")
    return records
