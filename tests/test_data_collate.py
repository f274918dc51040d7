"""Encoding and collation: labels only on assistant tokens, placeholders expanded, media batched."""

import json
import logging

import numpy as np
import pytest
import torch

from storm_vlm.data.collator import StormCollator
from storm_vlm.data.datasets import LlavaDataset
from storm_vlm.data.records import load_records
from storm_vlm.errors import ConfigError, StormError
from train_helpers import processor_and_model, write_image, write_video


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_video(root / "four.mp4", np.full((4, 32, 32, 3), 90, np.uint8))
    write_video(root / "two.mp4", np.full((2, 32, 32, 3), 150, np.uint8))
    write_image(root / "img.png", np.full((20, 24, 3), 200, np.uint8))
    (root / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    return root


def rec(i, q, a, **media):
    conv = []
    for qq, aa in zip(q, a):
        conv += [{"from": "human", "value": qq}, {"from": "gpt", "value": aa}]
    return {"id": str(i), **media, "conversations": conv}


def dataset(media, tmp_path, records, num_frames=4):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc, _ = processor_and_model()
    return LlavaDataset(load_records(f, media), proc, num_frames=num_frames)


def test_labels_only_on_assistant_turns_multi_turn_video(media, tmp_path):
    ds = dataset(media, tmp_path, [rec(0, ["What colour?", "Sure?"], ["It was red.", "Yes, red."], video="four.mp4")])
    proc, model = processor_and_model()
    item = ds[0]
    ids, labels = item["input_ids"], item["labels"]
    tok = proc.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids[labels != -100]) == "It was red.<|im_end|>Yes, red.<|im_end|>"
    assert bool((labels[labels != -100] == ids[labels != -100]).all())
    # The placeholder (added to the first human turn) became exactly the model's visual token count.
    n_visual = int((ids == proc.video_token_id).sum())
    assert n_visual == model.config.num_visual_tokens(4) > 1
    assert bool((labels[ids == proc.video_token_id] == -100).all())
    assert "user\n<video>" in tok.decode(ids)
    assert int((labels == end).sum()) == 2  # both assistant end-of-turn tokens are learned
    assert item["pixel_values_videos"].shape == (4, 3, 32, 32) and item["num_skipped"] == 0


def test_collate_mixed_batch_runs_through_the_model(media, tmp_path):
    ds = dataset(media, tmp_path, [
        rec(0, ["<video>\nWhat?"], ["Grey."], video="four.mp4"),
        rec(1, ["Describe."], ["A white square."], image="img.png"),
        rec(2, ["Hello there, how are you?"], ["Fine."]),
        rec(3, ["What?"], ["Light grey."], video="two.mp4"),
    ], num_frames=4)
    proc, model = processor_and_model()
    items = [ds[i] for i in range(4)]
    assert "pixel_values" not in items[2] and "pixel_values_videos" not in items[2]
    assert items[1]["pixel_values"].shape == (1, 3, 32, 32)
    assert int((items[1]["input_ids"] == proc.image_token_id).sum()) == model.config.num_visual_tokens(1)
    batch = StormCollator(pad_token_id=proc.tokenizer.pad_token_id)(items)
    lengths = [len(i["input_ids"]) for i in items]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):
        assert bool((batch["labels"][row, n:] == -100).all())
        assert bool((batch["input_ids"][row, n:] == proc.tokenizer.pad_token_id).all())
    # two.mp4 holds 2 frames; load_video repeats real frames to reach num_frames (none invented from nothing).
    assert batch["pixel_values_videos"].shape == (2, 4, 3, 32, 32)
    assert batch["video_frame_mask"].all()
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_videos",
                                             "video_frame_mask", "pixel_values", "labels")})
    assert torch.isfinite(out.loss)


def test_multi_image_records_train_with_each_image_at_its_placeholder(media, tmp_path):
    """LLaVA-OneVision's multi-image records: "image" lists the files, one <image> per file in order
    (without placeholders, one per image goes before the first question)."""
    write_image(media / "dark.png", np.full((24, 20, 3), 30, np.uint8))
    ds = dataset(media, tmp_path, [
        rec(0, ["First <image>, then <image>: which is brighter?"], ["The first."], image=["img.png", "dark.png"]),
        rec(1, ["Describe."], ["A white square."], image="img.png"),
        rec(2, ["Compare them."], ["Same size."], image=["dark.png", "img.png"]),
    ])
    proc, model = processor_and_model()
    items = [ds[i] for i in range(3)]
    assert [tuple(i["pixel_values"].shape[:1]) for i in items] == [(2,), (1,), (2,)]
    per_image = model.config.num_visual_tokens(1)
    assert [int((i["input_ids"] == proc.image_token_id).sum()) for i in items] == [2 * per_image, per_image,
                                                                                    2 * per_image]
    assert items[2]["pixel_values"][0].mean() < items[2]["pixel_values"][1].mean()  # dark.png, then img.png
    batch = StormCollator(pad_token_id=proc.tokenizer.pad_token_id)(items)
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    torch.testing.assert_close(batch["pixel_values"][3], items[2]["pixel_values"][0])  # batch order, then file order
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")})
        alone = model(**{k: v[None] for k, v in items[0].items() if k in ("input_ids", "labels")},
                      pixel_values=items[0]["pixel_values"])
    assert torch.isfinite(out.loss)
    n = items[0]["input_ids"].shape[0]
    torch.testing.assert_close(out.logits[0, :n], alone.logits[0], atol=1e-5, rtol=0)  # row 0 read its own images


def test_collator_pads_videos_in_time_with_a_mask():
    pv = [torch.ones(3, 3, 4, 4), torch.full((1, 3, 4, 4), 2.0)]
    samples = [{"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 6]), "pixel_values_videos": v,
                "num_skipped": k} for k, v in enumerate(pv)]
    batch = StormCollator(pad_token_id=0)(samples)
    assert batch["video_frame_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["pixel_values_videos"][1, 1:].abs().sum() == 0 and batch["pixel_values_videos"][1, 0].mean() == 2
    assert batch["num_skipped"] == 1


def test_unreadable_media_is_skipped_counted_and_logged(media, tmp_path, caplog):
    ds = dataset(media, tmp_path, [
        rec("ok0", ["Q"], ["A0"], video="four.mp4"),
        rec("bad", ["Q"], ["A1"], video="broken.mp4"),
        rec("gone", ["Q"], ["A2"], image="missing.png"),
        rec("ok3", ["Q"], ["A3"], image="img.png"),
    ])
    with caplog.at_level(logging.WARNING, logger="storm_vlm.data"):
        item = ds[1]
    assert item["record_index"] == 3 and item["num_skipped"] == 2  # bad -> gone -> ok3
    assert item["pixel_values"].shape == (1, 3, 32, 32)
    assert "id bad" in caplog.text and "id gone" in caplog.text
    assert ds[2]["record_index"] == 3 and ds[2]["num_skipped"] == 1
    assert ds[0]["record_index"] == 0 and ds[0]["num_skipped"] == 0


def test_any_media_failure_is_a_skip_never_a_traceback(media, tmp_path, caplog, monkeypatch):
    """A FIFO (would block the loader), a decompression bomb, and a decoder raising something
    load_video does not wrap (OverflowError: what `"start": 1e308` raised on main) are skips."""
    import os

    from PIL import Image

    from storm_vlm.data import datasets as D

    os.mkfifo(media / "pipe.mp4")
    ds = dataset(media, tmp_path, [
        rec("fifo", ["Q"], ["A0"], video="pipe.mp4"),
        rec("bomb", ["Q"], ["A1"], image="img.png"),
        rec("overflow", ["Q"], ["A2"], video="two.mp4"),
        rec("ok", ["Q"], ["A3"], video="four.mp4"),
    ])
    real = D.load_video

    def load_video(path, **kw):
        if path.endswith("two.mp4"):
            raise OverflowError("cannot convert float infinity to integer")
        return real(path, **kw)

    monkeypatch.setattr(D, "load_video", load_video)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 20 x 24 px is now a "bomb"
    with caplog.at_level(logging.WARNING, logger="storm_vlm.data"):
        item = ds[0]
    assert item["record_index"] == 3 and item["num_skipped"] == 3
    log = caplog.text
    assert "t.jsonl:1 (id fifo)" in log and "not a regular file" in log
    assert "t.jsonl:2 (id bomb)" in log and "DecompressionBombError" in log
    assert "t.jsonl:3 (id overflow)" in log and "OverflowError" in log


def test_no_readable_media_at_all_names_the_first_cause(media, tmp_path):
    ds = dataset(media, tmp_path, [rec("bad", ["Q"], ["A"], video="broken.mp4"),
                                   rec("gone", ["Q"], ["A"], image="missing.png")])
    with pytest.raises(StormError, match=r"none of the 2 training records can make a sample \(first: .*t\.jsonl:1"):
        ds[0]


def test_a_folder_of_frames_is_read_as_the_video(media, tmp_path):
    """LLaVA-NeXT-style data stores some videos as a folder of frame images: they are sampled
    uniformly in name order (non-image files ignored); `start`/`end` cannot cut a folder (no
    timestamps), so such a record is a skip naming the cause."""
    for i in range(6):
        write_image(media / "clip" / f"{i:03d}.jpg", np.full((32, 32, 3), 20 + 40 * i, np.uint8))
    (media / "clip" / "notes.txt").write_text("not a frame")
    ds = dataset(media, tmp_path, [rec("folder", ["<image>\nWhat happens?"], ["It brightens."], video="clip"),
                                   {**rec("cut", ["Q"], ["A"], video="clip"), "start": 1.0},
                                   rec("ok", ["Q"], ["A"], video="four.mp4")], num_frames=3)
    item = ds[0]
    assert item["record_index"] == 0 and item["num_skipped"] == 0
    pixels = item["pixel_values_videos"]
    assert pixels.shape == (3, 3, 32, 32)
    means = pixels.mean(dim=(1, 2, 3))
    assert bool((means[1:] > means[:-1]).all())  # frames 0, 2 (or 3), 5: in name order
    assert ds[1]["record_index"] == 2 and ds[1]["num_skipped"] == 1
    assert "no timestamps" in ds._bad[1]


def test_a_record_too_long_for_max_length_is_skipped_not_fatal(media, tmp_path, caplog):
    """A record whose text leaves no answer token (or would split its visual tokens) under
    max_length shows only when its sample is built: it is skipped and logged, the run goes on."""
    long_question = "word " * 400
    f = tmp_path / "t.jsonl"
    records = [rec("long", [long_question], ["A"], video="four.mp4"),
               rec("split", [long_question, "<video>\nAnd now?"], ["A", "B"], video="two.mp4"),
               rec("ok", ["Q"], ["A"], video="four.mp4")]
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc, _ = processor_and_model()
    ds = LlavaDataset(load_records(f, media), proc, num_frames=4, max_length=200)
    with caplog.at_level(logging.WARNING, logger="storm_vlm.data"):
        item = ds[0]
    assert item["record_index"] == 2 and item["num_skipped"] == 2
    assert "t.jsonl:1 (id long): too long: no assistant token left" in caplog.text
    assert "t.jsonl:2 (id split): too long:" in caplog.text and "split the visual tokens" in caplog.text


def test_max_length_too_short_for_any_sample_is_a_config_error(media, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(rec("v", ["Q"], ["A"], video="four.mp4")) + "\n")
    proc, _ = processor_and_model()
    records = load_records(f, media)
    need = proc.num_visual_tokens(4)
    with pytest.raises(ConfigError, match=r"key 'max_length': .* a 4-frame video"):
        LlavaDataset(records, proc, num_frames=4, max_length=need)
    assert len(LlavaDataset(records, proc, num_frames=4, max_length=need + 64)) == 1
