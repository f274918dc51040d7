"""Reading LLaVA-style training records (JSON array or JSONL) into validated `Conversation`s.

Accepted record (one JSON object):
    {"id": "...", "video": "rel/path.mp4" | "image": "rel/path.png" | neither (text-only),
     "conversations": [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt", "value": "..."}, ...]}
Roles: human/user, gpt/assistant (and an optional leading system turn). Turns alternate
user/assistant and end with an assistant turn. `"image"`/`"video"` may also be a one-element
list. Optional `"start"`/`"end"` (seconds) cut a clip from a video.

A media path is relative to `media_root` (an absolute path must still lie inside it); a path
that resolves outside the root is rejected with a StormError naming the record. When a
record has media but no placeholder, `<image>\\n` / `<video>\\n` is put in front of the first
user turn; a placeholder without media (or more than one) is an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from storm_vlm.errors import StormError
from storm_vlm.utils import IMAGE_TOKEN, VIDEO_TOKEN

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Conversation:
    """One training example. `messages`: [{"role": "system"|"user"|"assistant", "content": str}]."""

    id: str
    messages: list[dict]
    where: str  # "file:line" (JSONL) or "file: record #i" (JSON array), for error messages
    image: Path | None = None
    video: Path | None = None
    start: float | None = None
    end: float | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def modality(self) -> str:
        return "video" if self.video is not None else "image" if self.image is not None else "text"


def _iter_raw(path: Path):
    """Yield (where, obj) for every record of a .json (array) or .jsonl file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StormError(f"{path}: cannot read training file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise StormError(f"{path}: not UTF-8 text ({exc})") from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".jsonl" or (stripped and not stripped.startswith("[")):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StormError(f"{path}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
            yield f"{path}:{lineno}", obj
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StormError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, list):
        raise StormError(f"{path}: a .json training file must hold a list of records, got {type(data).__name__}")
    for i, obj in enumerate(data):
        yield f"{path}: record #{i}", obj


def resolve_media(media_root: Path, rel, where: str, rid: str, key: str) -> Path:
    """media_root / rel, refusing anything that resolves outside media_root (.., absolute, symlinks)."""
    if isinstance(rel, list):
        if len(rel) != 1:
            raise StormError(f"{where} (id {rid}): {key!r} lists {len(rel)} files; one per record is supported")
        rel = rel[0]
    if not isinstance(rel, str) or not rel:
        raise StormError(f"{where} (id {rid}): {key!r} must be a file path, got {rel!r}")
    root = media_root.resolve()
    full = (root / rel).resolve()
    if not full.is_relative_to(root):
        raise StormError(f"{where} (id {rid}): {key} path {rel!r} escapes the media root {str(root)!r}")
    return full


def _parse_record(obj, where: str, media_root: Path, index: int) -> Conversation:
    if not isinstance(obj, dict):
        raise StormError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    rid = str(obj.get("id", index))
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise StormError(f"{where} (id {rid}): 'conversations' must be a non-empty list")
    messages = []
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise StormError(f"{where} (id {rid}): turn {t} must be an object")
        role = _ROLES.get(turn.get("from", turn.get("role")))
        value = turn.get("value", turn.get("content"))
        if role is None:
            raise StormError(f"{where} (id {rid}): turn {t} has unknown role {turn.get('from', turn.get('role'))!r}")
        if not isinstance(value, str):
            raise StormError(f"{where} (id {rid}): turn {t} has no text 'value'")
        if role == "system" and t != 0:
            raise StormError(f"{where} (id {rid}): a system turn may only come first (turn {t})")
        messages.append({"role": role, "content": value})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or [m["role"] for m in body] != expected[: len(body)] or body[-1]["role"] != "assistant":
        roles = " ".join(m["role"] for m in messages)
        raise StormError(
            f"{where} (id {rid}): turns must alternate human/gpt and end with a gpt turn (got: {roles})"
        )

    image = obj.get("image")
    video = obj.get("video")
    if image is not None and video is not None:
        raise StormError(f"{where} (id {rid}): a record has either 'image' or 'video', not both")
    rec = Conversation(id=rid, messages=messages, where=where)
    if image is not None:
        rec.image = resolve_media(media_root, image, where, rid, "image")
    if video is not None:
        rec.video = resolve_media(media_root, video, where, rid, "video")
        for key in ("start", "end"):
            v = obj.get(key)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise StormError(f"{where} (id {rid}): {key!r} must be seconds, got {v!r}")
                setattr(rec, key, float(v))

    for placeholder, present in ((IMAGE_TOKEN, rec.image is not None), (VIDEO_TOKEN, rec.video is not None)):
        count = sum(m["content"].count(placeholder) for m in messages)
        in_user = sum(m["content"].count(placeholder) for m in messages if m["role"] == "user")
        if present:
            if count == 0:
                first_user = next(m for m in messages if m["role"] == "user")
                first_user["content"] = f"{placeholder}\n{first_user['content']}"
            elif count != 1 or in_user != 1:
                raise StormError(
                    f"{where} (id {rid}): {placeholder} must appear exactly once, in a human turn (found {count})"
                )
        elif count:
            name = placeholder.strip("<>")
            raise StormError(f"{where} (id {rid}): text has {placeholder} but the record has no {name!r} file")
    rec.extra = {k: v for k, v in obj.items() if k not in ("id", "image", "video", "conversations", "start", "end")}
    return rec


def load_records(path: str | os.PathLike, media_root: str | os.PathLike) -> list[Conversation]:
    """Parse and validate every record of a LLaVA-style .json / .jsonl file (no media is read)."""
    path, media_root = Path(path), Path(media_root)
    if not media_root.is_dir():
        raise StormError(f"media_root {str(media_root)!r} is not a folder")
    records = [_parse_record(obj, where, media_root, i) for i, (where, obj) in enumerate(_iter_raw(path))]
    if not records:
        raise StormError(f"{path}: no training records")
    return records
