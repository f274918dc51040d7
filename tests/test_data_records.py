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
        ({"video": "a.mp4", "conversations": conv("<video><video> Q")}, "exactly once"),
        ({"image": "a.png", "video": "a.mp4", "conversations": conv()}, "not both"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_records_name_the_line(tmp_path, record, msg):
    f = write_jsonl(tmp_path / "t.jsonl", [{"conversations": conv()}, record])
    with pytest.raises(StormError, match=msg) as info:
        load_records(f, tmp_path)
    assert "t.jsonl:2" in str(info.value)
