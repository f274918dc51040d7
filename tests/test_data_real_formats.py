"""Training files in the layouts the public releases use, read by `storm_vlm.data.records`.

The fixtures copy the *shape* of real annotations (checked against LLaVA-NeXT's
`llava/train/train.py` LazySupervisedDataset / preprocess_qwen and its `scripts/**/*.yaml` data
mixtures, the LLaVA-Pretrain / LLaVA-Video-178K / LLaVA-OneVision files): a LLaVA-NeXT data yaml
(`datasets: [{json_path, sampling_strategy}]`), ShareGPT-derived records that open with a gpt turn,
`<image>` at the end of the prompt (LCS-558K), interleaved multi-image turns (OneVision), integer
ids, text-only records, unicode, a video given as a folder of frames.
"""

import json

import numpy as np
import pytest

from storm_vlm.data.datasets import LlavaDataset
from storm_vlm.data.records import load_records
from storm_vlm.errors import StormError
from train_helpers import processor_and_model, write_image


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


def qa(i, **media):
    return {"id": f"r{i}", **media, "conversations": [human(f"Question {i}?"), gpt(f"Answer {i}.")]}


@pytest.fixture
def mixture(tmp_path):
    """A LLaVA-NeXT data yaml over a JSON array (LLaVA-Video-178K style, 4 records) and a JSONL file
    (10 records, text-only) in a sub-folder, named by paths relative to the yaml."""
    (tmp_path / "ann").mkdir()
    video = tmp_path / "ann" / "0_30_s_academic_oe_v0_1_qa_processed.json"
    video.write_text(json.dumps([qa(i, video=f"academic_source/Charades/V{i}.mp4", data_source="0_30_s_academic_v0_1")
                                 for i in range(4)], indent=4))
    text = tmp_path / "ann" / "magpie.jsonl"
    text.write_text("".join(json.dumps(qa(i)) + "\n" for i in range(10)))
    return tmp_path, video, text


def write_yaml(path, entries):
    path.write_text("datasets:\n" + "".join(f"  - json_path: {j}\n" + (f"    sampling_strategy: \"{s}\"\n" if s else "")
                                            for j, s in entries))
    return path


def test_llava_next_data_yaml_is_read_with_its_sampling_strategies(mixture):
    """LLaVA-NeXT trains from `--data_path mix.yaml`; before, such a file was read as JSONL and
    stopped with "malformed JSON" at its line 1."""
    root, video, text = mixture
    y = write_yaml(root / "mix.yaml", [("ann/0_30_s_academic_oe_v0_1_qa_processed.json", "first:50%"),
                                       (str(text), "end:3"), ("ann/magpie.jsonl", "random:4"),
                                       ("ann/magpie.jsonl", None)])  # no strategy: all
    recs = load_records(y, root)
    ids = [r.id for r in recs]
    assert ids[:2] == ["r0", "r1"] and recs[0].modality == "video"  # ceil(50% of 4)
    assert recs[0].where == f"{video}:2 (record #0)"  # each record names its own file and line
    assert ids[2:5] == ["r7", "r8", "r9"] and recs[2].where == f"{text}:8"
    picked = ids[5:9]
    assert len(set(picked)) == 4 and picked == sorted(picked, key=lambda s: int(s[1:]))  # file order
    assert ids[9:] == [f"r{i}" for i in range(10)] and len(recs) == 19
    assert [r.id for r in load_records(y, root)] == ids  # random:N is seeded: every rank, every resume alike


@pytest.mark.parametrize(
    "body, msg",
    [
        ("datasets:\n  - json_path: ann/magpie.jsonl\n    sampling_strategy: 'first:10'\n"
         "  - json_path: ann/magpie.jsonl\n    sampling_strategy: 'half'\n", r"datasets\[1\]: sampling_strategy"),
        ("datasets:\n  - json_path: ann/missing.json\n", r"datasets\[0\]: json_path .*missing\.json.* is not a file"),
        ("datasets:\n  - json_path: ann/magpie.jsonl\n    sampling_stratgy: 'all'\n",
         r"datasets\[0\]: unknown key\(s\) 'sampling_stratgy'"),
        ("- json_path: ann/magpie.jsonl\n", "needs a non-empty 'datasets' list"),
        ("datasets: [\n", r"not valid YAML \(line 2, column 1: expected the node content, but found '<stream end>'\)$"),
    ],
)
def test_a_bad_data_yaml_names_the_yaml_and_the_entry(mixture, body, msg):
    root, _, _ = mixture
    y = root / "mix.yaml"
    y.write_text(body)
    with pytest.raises(StormError, match=msg) as info:
        load_records(y, root)
    assert str(info.value).startswith(f"{y}: ")


def test_a_malformed_record_in_a_mixture_names_its_own_file_and_line(mixture):
    root, _, text = mixture
    with text.open("a") as f:
        f.write(json.dumps({"id": "bad", "conversations": [human("<video>\nQ?"), gpt("A.")]}) + "\n")
    y = write_yaml(root / "mix.yml", [("ann/magpie.jsonl", "end:1")])
    with pytest.raises(StormError, match=rf"{text}:11 \(id bad\): text has <video> but the record has no 'video'"):
        load_records(y, root)
    # a record the strategy leaves out is never looked at, as in LLaVA-NeXT
    assert [r.id for r in load_records(write_yaml(y, [("ann/magpie.jsonl", "first:10")]), root)][-1] == "r9"


def test_a_sharegpt_record_opening_with_gpt_drops_that_turn(tmp_path):
    """ShareGPT-style conversations can open with a gpt turn; LLaVA-NeXT's preprocess_qwen (and
    LLaVA's preprocess) drop a first turn that is not from human. Before, the run stopped."""
    f = tmp_path / "t.jsonl"
    sharegpt = [gpt("Sure, here it is."), human("Thanks! And in French?"), gpt("Merci !")]
    with_system = [{"from": "system", "value": "Be brief."}, gpt("Hi."), human("Q?"), gpt("A.")]
    f.write_text(json.dumps({"id": "i6IyJda_1", "conversations": sharegpt}) + "\n"
                 + json.dumps({"id": "s", "conversations": with_system}) + "\n")
    a, b = load_records(f, tmp_path)
    assert a.messages == [{"role": "user", "content": "Thanks! And in French?"},
                          {"role": "assistant", "content": "Merci !"}]
    assert [m["role"] for m in b.messages] == ["system", "user", "assistant"]
    # only one opening gpt turn goes; what is left must still alternate
    f.write_text(json.dumps({"conversations": [gpt("a"), gpt("b"), human("c"), gpt("d")]}) + "\n")
    with pytest.raises(StormError, match=r"t\.jsonl:1 \(id 0\): turns must alternate .*got: assistant assistant user"):
        load_records(f, tmp_path)


def test_public_record_shapes_encode_with_one_visual_block_per_file(tmp_path):
    """Coverage of shapes that already read correctly (kept so a change to the reader keeps them):
    LCS-558K's `<image>` after the prompt, OneVision's interleaved multi-image turns, an integer id,
    a text-only record, unicode, and a video as a folder of frames with `<image>` as its placeholder."""
    for name, grey in (("00453/004539375.jpg", 200), ("m4/a.png", 90), ("m4/b.png", 30)):
        write_image(tmp_path / name, np.full((20, 24, 3), grey, np.uint8))
    for i in range(5):
        write_image(tmp_path / "shareVideoGPTV/frames/all_frames/vid1" / f"c01_{i + 1:04d}.jpg",
                    np.full((16, 16, 3), 40 * i, np.uint8))
    f = tmp_path / "mix.json"
    f.write_text(json.dumps([
        {"id": "004539375", "image": "00453/004539375.jpg",
         "conversations": [human("Render a clear and concise summary of the photo.\n<image>"), gpt("a sofa")]},
        {"id": 17, "image": ["m4/a.png", "m4/b.png"],
         "conversations": [human("<image>\nFirst?"), gpt("Grey."), human("And <image>?"), gpt("Darker.")]},
        {"id": "txt", "conversations": [human("¿Qué es 🙂?"), gpt("一个表情。")]},
        {"id": "hound", "video": "shareVideoGPTV/frames/all_frames/vid1",
         "conversations": [human("<image>\nWhat changes?"), gpt("It gets brighter.")]},
    ], ensure_ascii=False, indent=2), encoding="utf-8")
    proc, model = processor_and_model()
    ds = LlavaDataset(load_records(f, tmp_path), proc, num_frames=4)
    items = [ds[i] for i in range(4)]
    assert [it["num_skipped"] for it in items] == [0] * 4 and ds.records[1].id == "17"
    per_image = model.config.num_visual_tokens(1)
    assert [int((it["input_ids"] == proc.image_token_id).sum()) for it in items] == [per_image, 2 * per_image, 0, 0]
    assert int((items[3]["input_ids"] == proc.video_token_id).sum()) == model.config.num_visual_tokens(4)
    assert items[1]["pixel_values"].shape[0] == 2 and items[3]["pixel_values_videos"].shape[0] == 4
    tok = proc.tokenizer
    assert tok.decode(items[1]["input_ids"][items[1]["labels"] != -100]) == "Grey.<|im_end|>Darker.<|im_end|>"
    assert tok.decode(items[2]["input_ids"][items[2]["labels"] != -100]) == "一个表情。<|im_end|>"


def test_a_turns_one_placeholder_goes_first_as_llava_next_puts_it(tmp_path):
    """LCS-558K writes the caption prompt before its <image>; LLaVA-NeXT moves a turn's lone
    placeholder to the front, which is also where inference puts the video."""
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    rows = [{"id": "lcs", "image": "a.png", "conversations": [
                {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                {"from": "gpt", "value": "a cat"}]},
            {"id": "two", "image": ["a.png", "b.png"], "conversations": [
                {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "same"}]}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    lcs, two = load_records(path, tmp_path)
    assert lcs.messages[0]["content"] == "<image>\nRender a clear and concise summary of the photo."
    assert two.messages[0]["content"] == "Compare <image> and <image>."  # several: left where they are
