"""LLaVA record parsing: placeholders, media paths confined to media_root, malformed input."""

import json

import pytest

from storm_vlm.data.records import load_records
from storm_vlm.errors import StormError


def conv(q="What happens?", a="A flash."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_placeholders_inserted_and_modalities(tmp_path):
    (tmp_path / "v").mkdir()
    f = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"id": "vid", "video": "v/a.mp4", "conversations": conv()},
            {"id": "img", "image": ["v/b.png"], "conversations": conv("<image>\nDescribe.")},
            {"id": "txt", "conversations": conv() + conv("And then?", "Nothing.")},
            {"id": "sys", "video": "v/c.mp4", "start": 1, "end": 2.5,
             "conversations": [{"from": "system", "value": "Be brief."}] + conv()},
        ],
    )
    recs = load_records(f, tmp_path)
    assert [r.modality for r in recs] == ["video", "image", "text", "video"]
    assert recs[0].messages[0] == {"role": "user", "content": "<video>\nWhat happens?"}
    assert recs[1].messages[0]["content"] == "<image>\nDescribe."  # already present: unchanged
    assert [m["role"] for m in recs[2].messages] == ["user", "assistant", "user", "assistant"]
    assert "<" not in "".join(m["content"] for m in recs[2].messages)
    assert recs[3].messages[1]["content"].startswith("<video>\n") and recs[3].start == 1.0 and recs[3].end == 2.5
    assert recs[0].video == (tmp_path / "v" / "a.mp4").resolve()


@pytest.mark.parametrize("rel", ["../outside.mp4", "v/../../outside.mp4", "/etc/passwd"])
def test_media_path_escaping_root_is_rejected(tmp_path, rel):
    root = tmp_path / "media"
    root.mkdir()
    f = write_jsonl(tmp_path / "t.jsonl", [{"id": "ok", "conversations": conv()},
                                           {"id": "evil", "video": rel, "conversations": conv()}])
    with pytest.raises(StormError, match=r"t\.jsonl:2 \(id evil\).*escapes the media root"):
        load_records(f, root)


def test_symlink_out_of_root_is_rejected(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    f = write_jsonl(tmp_path / "t.jsonl", [{"id": "l", "image": "link.png", "conversations": conv()}])
    with pytest.raises(StormError, match="escapes"):
        load_records(f, root)


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"conversations": conv()}) + "\n\n{not json\n")
    with pytest.raises(StormError, match=r"t\.jsonl:3: malformed JSON"):
        load_records(f, tmp_path)
    g = tmp_path / "t.json"
    g.write_text('[\n {"conversations": []},\n')
    with pytest.raises(StormError, match=r"t\.json:3: malformed JSON"):
        load_records(g, tmp_path)


@pytest.mark.parametrize(
    "record, msg",
    [
        ({"conversations": [{"from": "gpt", "value": "hi"}]}, "alternate"),
        ({"conversations": conv() + [{"from": "human", "value": "?"}]}, "end with a gpt turn"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown role"),
        ({"conversations": conv("<video>\nQ")}, "has no 'video' file"),
        ({"video": "a.mp4", "conversations": conv("<video><video> Q")}, r"<video> must appear 1 time\(s\)"),
        ({"image": ["a.png", "b.png"], "conversations": conv("<image> Q")}, r"<image> must appear 2 time\(s\)"),
        ({"image": [], "conversations": conv()}, "'image' lists no files"),
        ({"image": "a.png", "video": "a.mp4", "conversations": conv()}, "not both"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_records_name_the_line(tmp_path, record, msg):
    f = write_jsonl(tmp_path / "t.jsonl", [{"conversations": conv()}, record])
    with pytest.raises(StormError, match=msg) as info:
        load_records(f, tmp_path)
    assert "t.jsonl:2" in str(info.value)


# ----------------------------------------------------------------------------- hostile records
@pytest.mark.parametrize(
    "extra, msg",
    [
        ({"start": 1e308}, r"'start' must be seconds between 0 and 1e\+07, got 1e\+308"),
        ({"end": -1}, "'end' must be seconds between 0"),
        ({"start": 3, "end": 2}, r"'start' \(3 s\) must be before 'end' \(2 s\)"),
        ({"start": 2, "end": 2}, "must be before"),
        ({"start": "1"}, "must be seconds"),
        ({"start": True}, "must be seconds"),
    ],
)
def test_clip_bounds_must_be_finite_seconds_in_order(tmp_path, extra, msg):
    f = write_jsonl(tmp_path / "t.jsonl", [{"id": "ok", "conversations": conv()},
                                           {"id": "clip", "video": "a.mp4", **extra, "conversations": conv()}])
    with pytest.raises(StormError, match=msg) as info:
        load_records(f, tmp_path)
    assert "t.jsonl:2 (id clip)" in str(info.value)


@pytest.mark.parametrize("literal", ["1e999", "-1e999", "NaN", "Infinity"])
def test_non_finite_numbers_are_refused_with_the_line(tmp_path, literal):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"conversations": conv()}) + "\n"
                 + '{"video": "a.mp4", "start": %s, "conversations": %s}\n' % (literal, json.dumps(conv())))
    with pytest.raises(StormError, match=r"t\.jsonl:2"):
        load_records(f, tmp_path)


@pytest.mark.parametrize(
    "record, msg",
    [
        ({"video": "a\x00b.mp4", "conversations": conv()}, "video path holds a NUL character"),
        ({"image": "a\ud800.png", "conversations": conv()}, r"image path holds an unpaired surrogate \(\\ud800\)"),
        ({"conversations": conv("What\x00?")}, "turn 0 holds a NUL character"),
        ({"id": "x\x00", "conversations": conv()}, "'id' holds a NUL character"),
        ({"id": {"a": 1}, "conversations": conv()}, "'id' must be a non-empty string or an integer"),
        ({"video": ".", "conversations": conv()}, "names the media root itself"),
    ],
)
def test_hostile_strings_are_config_errors_naming_the_line(tmp_path, record, msg):
    f = write_jsonl(tmp_path / "t.jsonl", [{"conversations": conv()}, record])
    with pytest.raises(StormError, match=msg) as info:
        load_records(f, tmp_path)
    assert "t.jsonl:2" in str(info.value)


def test_symlink_loop_is_a_clean_error(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    f = write_jsonl(tmp_path / "t.jsonl", [{"video": "loop/x.mp4", "conversations": conv()}])
    with pytest.raises(StormError, match=r"t\.jsonl:1 \(id 0\)"):
        load_records(f, tmp_path)


def test_deep_nesting_is_a_clean_error_in_jsonl_and_in_an_array(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"conversations": conv()}) + "\n" + '{"x": %s}\n' % deep)
    with pytest.raises(StormError, match=r"t\.jsonl:2: JSON nested too deeply"):
        load_records(f, tmp_path)
    g = tmp_path / "t.json"
    g.write_text("[\n" + json.dumps({"conversations": conv()}) + ",\n\n" + deep + "\n]")
    with pytest.raises(StormError, match=r"t\.json:4 \(record #1\): JSON nested too deeply"):
        load_records(g, tmp_path)


def test_an_over_long_line_and_bad_utf8_name_their_line(tmp_path, monkeypatch):
    from storm_vlm.data import records as R

    monkeypatch.setattr(R, "MAX_LINE_BYTES", 200)
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"conversations": conv()}) + "\n"
                 + json.dumps({"conversations": conv(a="x" * 500)}) + "\n")
    with pytest.raises(StormError, match=r"t\.jsonl:2: line longer than 200 bytes"):
        load_records(f, tmp_path)
    f.write_bytes(json.dumps({"conversations": conv()}).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(StormError, match=r"t\.jsonl:2: not UTF-8 text"):
        load_records(f, tmp_path)


def test_array_records_carry_their_line_and_index_and_a_bom_is_fine(tmp_path):
    g = tmp_path / "t.json"
    g.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"id": "a", "conversations": conv()},
                                               {"id": "b", "conversations": conv()}], indent=1).encode())
    a, b = load_records(g, tmp_path)
    assert a.where == f"{g}:2 (record #0)" and b.where.endswith("t.json:15 (record #1)")
    h = tmp_path / "u.jsonl"  # a record holding U+2028 stays one line (JSONL splits on \n only)
    h.write_text(json.dumps({"id": "s", "conversations": conv("a\u2028b")}, ensure_ascii=False) + "\n",
                 encoding="utf-8")
    (s,) = load_records(h, tmp_path)
    assert s.messages[0]["content"] == "a\u2028b"


def test_train_command_stops_on_a_hostile_record_with_one_message(tmp_path, capsys):
    """`"start": 1e308` passed validation on main and the run died in the decoder with a traceback."""
    import yaml

    from storm_vlm.cli import main
    from train_helpers import base_config, make_dataset

    data = make_dataset(tmp_path / "data", num_videos=2, num_images=0)
    lines = data["train"].read_text().splitlines()
    hostile = dict(json.loads(lines[1]), start=1e308)
    data["train"].write_text(lines[0] + "\n" + json.dumps(hostile) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path / "out", data, per_device_batch_size=1, max_steps=1)))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{data['train']}:2 (id v1): 'start' must be seconds" in err and "Traceback" not in err


def test_llava_video_178k_records_use_image_as_the_video_placeholder(tmp_path):
    """LLaVA-Video-178K / LLaVA-NeXT write "<image>" for a video's frames (their one visual token):
    a JSON array of such records, multi-turn, with the dataset's extra keys, is read as video records."""
    f = tmp_path / "0_30_s_academic_v0_1_cap_processed.json"
    f.write_text(json.dumps([
        {"id": "v_abc123", "conversations": [
            {"from": "human", "value": "<image>\nWhat does the person do first?"},
            {"from": "gpt", "value": "Opens the door."},
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Sits down."}],
         "data_source": "0_30_s_academic_v0_1", "video": "academic_source/Charades/ABC12.mp4"},
    ], indent=4))
    (rec,) = load_records(f, tmp_path)
    assert rec.modality == "video" and rec.video == (tmp_path / "academic_source/Charades/ABC12.mp4").resolve()
    assert rec.messages[0]["content"] == "<video>\nWhat does the person do first?"
    assert "<image>" not in "".join(m["content"] for m in rec.messages)
    assert rec.extra == {"data_source": "0_30_s_academic_v0_1"}
    # "<image>" with no video and no image is still an error, and so is a second placeholder
    bad = write_jsonl(tmp_path / "b.jsonl", [{"video": "a.mp4", "conversations": conv("<image>\n<image>\nQ")}])
    with pytest.raises(StormError, match=r"<video> must appear 1 time\(s\).*found 2"):
        load_records(bad, tmp_path)
