"""Training files as users bring them: large files naming media in a few folders, JSONL joined
with `cat`, arrays saved as .jsonl, files from Windows tools, pretty-printed objects, and records
whose answers are empty."""

import json
import logging
import os

import pytest

from storm_vlm.data.datasets import LlavaDataset
from storm_vlm.data.records import load_records
from storm_vlm.errors import StormError
from train_helpers import processor_and_model


def conv(*pairs):
    return [{"from": role, "value": text} for q, a in pairs for role, text in (("human", q), ("gpt", a))]


def record(rid, *pairs, **media):
    return {"id": rid, **media, "conversations": conv(*pairs)}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_media_paths_resolve_each_folder_once_and_keep_every_escape_refused(tmp_path, monkeypatch):
    """Each media path was resolved from the root, component by component (plus the root itself
    again), for every record: most of the time spent loading a large file. Folders are now resolved
    once; the paths are still exactly what `Path.resolve()` gives, and a symlink out is still refused
    when its folder was already seen."""
    root = tmp_path / "media"
    (root / "coco" / "train2017").mkdir(parents=True)
    (root / "frames" / "vid1").mkdir(parents=True)
    (root / "alias").symlink_to(root / "coco")  # a folder symlink that stays inside
    (root / "coco" / "train2017" / "same.jpg").symlink_to(root / "frames" / "vid1")  # a file symlink inside
    tricky = ["alias/train2017/a.jpg", "coco/./train2017/b.jpg", "coco//train2017/c.jpg",
              "frames/../coco/train2017/d.jpg", str(root / "coco" / "train2017" / "e.jpg"),
              "coco/train2017/same.jpg", "frames/vid1/", "frames/vid1/..", "f.jpg"]
    bulk = [f"coco/train2017/{i:012d}.jpg" for i in range(300)]
    f = write_jsonl(tmp_path / "t.jsonl", [record(str(i), ("Q", "A"), image=p) for i, p in enumerate(tricky + bulk)])
    calls = []
    realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, **kw: calls.append(p) or realpath(p, **kw))
    recs = load_records(f, root)
    monkeypatch.undo()
    assert len(calls) < 15  # the root, each folder once, the symlinked file, the paths ending in ".."
    assert [r.images[0] for r in recs] == [(root / p).resolve() for p in tricky + bulk]
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (root / "coco" / "train2017" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    f = write_jsonl(f, [record("ok", ("Q", "A"), image="coco/train2017/1.jpg"),
                        record("evil", ("Q", "A"), image="coco/train2017/link.jpg")])
    with pytest.raises(StormError, match=r"t\.jsonl:2 \(id evil\): image path .* escapes the media root"):
        load_records(f, root)


def test_a_record_whose_every_answer_is_empty_is_skipped_and_counted(tmp_path, caplog):
    """An empty gpt reply leaves only the end-of-turn token as a label: a record of nothing else
    taught the model to answer nothing, silently. It is now a counted, logged skip; a record with
    one real answer among empty ones still trains."""
    f = write_jsonl(tmp_path / "t.jsonl", [
        record("empty", ("What is shown?", "")),
        record("blank", ("What is shown?", " \n"), ("And now?", "\t")),
        record("partly", ("What is shown?", ""), ("And now?", "A dog.")),
    ])
    proc, _ = processor_and_model()
    ds = LlavaDataset(load_records(f, tmp_path), proc, num_frames=4)
    with caplog.at_level(logging.WARNING, logger="storm_vlm.data"):
        item = ds[0]
    assert item["record_index"] == 2 and item["num_skipped"] == 2
    assert [s["id"] for s in item["skipped"]] == ["empty", "blank"]
    assert all("every gpt reply is empty" in s["cause"] for s in item["skipped"])
    assert "t.jsonl:2 (id blank)" in caplog.text
    assert proc.tokenizer.decode(item["input_ids"][item["labels"] != -100]) == "<|im_end|>A dog.<|im_end|>"
    only_empty = LlavaDataset(load_records(write_jsonl(f, [record("e", ("Q", ""))]), tmp_path), proc, num_frames=4)
    with pytest.raises(StormError, match=r"none of the 1 training records .*t\.jsonl:1: no answer"):
        only_empty[0]


REC = record("a", ("What is shown? é", "A cat."))


@pytest.mark.parametrize(
    "name, data, lines",
    [
        # a JSON array saved under a .jsonl name stopped at line 1 ("Expecting value")
        ("array.jsonl", json.dumps([REC, REC], indent=2).encode(), [2, 15]),
        # JSONL files joined with `cat`, the second saved with a byte-order mark ("Expecting value" at line 2)
        ("joined.jsonl", (json.dumps(REC) + "\n").encode() + b"\xef\xbb\xbf" + (json.dumps(REC) + "\n").encode(),
         [1, 2]),
    ],
)
def test_files_that_hold_valid_records_are_read(tmp_path, name, data, lines):
    f = tmp_path / name
    f.write_bytes(data)
    recs = load_records(f, tmp_path)
    assert [int(r.where.split(":")[1].split()[0]) for r in recs] == lines
    assert all(r.messages[0]["content"] == "What is shown? é" for r in recs)


@pytest.mark.parametrize(
    "name, data, msg",
    [
        # PowerShell's `>` / Out-File and Notepad's "Unicode" write UTF-16 (with or without a BOM):
        # before, "not UTF-8 text (byte 1 of the line)"
        ("ps.json", json.dumps([REC]).encode("utf-16"), r"ps\.json: UTF-16 or UTF-32 text .*save it as UTF-8"),
        ("le.jsonl", json.dumps(REC).encode("utf-16-le"), r"le\.jsonl: UTF-16 or UTF-32 text"),
        # a pretty-printed object (one record, or records under a key) was only "Expecting property name"
        ("one.json", json.dumps(REC, indent=2).encode(),
         r"one\.json:1: malformed JSON .*JSONL holds one whole record per line \(a pretty-printed file must be "
         r"one JSON array of records\)"),
        # a file cut short while it was written
        ("cut.jsonl", (json.dumps(REC) + "\n" + json.dumps(REC)[:40]).encode(),
         r"cut\.jsonl:2: .*one whole record per"),
    ],
)
def test_files_users_save_wrongly_are_named_for_what_they_are(tmp_path, name, data, msg):
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(StormError, match=msg):
        load_records(f, tmp_path)


def test_a_placeholder_in_the_system_turn_is_named_as_outside_human_turns(tmp_path):
    """The message blamed "gpt turns" for a placeholder written in the system turn."""
    f = write_jsonl(tmp_path / "t.jsonl", [{"image": "a.png", "conversations": [
        {"from": "system", "value": "You see <image>."}] + conv(("Q", "A"))}])
    with pytest.raises(StormError, match=r"t\.jsonl:1 \(id 0\): <image> .*found 1, 1 of them outside human turns"):
        load_records(f, tmp_path)
