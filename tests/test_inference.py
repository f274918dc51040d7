"""storm_vlm.inference (one loader, one message builder, a predictor that renders once) and
storm_vlm.precision (one vocabulary, one resolver)."""

import shutil

import pytest
import torch
from helpers import random_video

from storm_vlm import precision as P
from storm_vlm.errors import StormError
from storm_vlm.inference import Predictor, build_messages, load_model, resolve_device
from storm_vlm.utils import check_model_dir


def test_build_messages_puts_the_video_first_in_the_first_user_turn():
    assert build_messages("What?") == [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}]
    msgs = build_messages("And then?", history=[("What?", "A cat.")], system="Be brief.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"][0] == {"type": "video"} and msgs[3]["content"] == [{"type": "text", "text": "And then?"}]
    assert build_messages("Hi", video=False)[0]["content"] == [{"type": "text", "text": "Hi"}]


def test_model_dir_check_names_the_cause_and_points_at_final(tmp_path):
    with pytest.raises(StormError, match="does not exist"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "stage" / "final").mkdir(parents=True)
    (tmp_path / "stage" / "final" / "config.json").write_text('{"model_type": "storm"}')
    with pytest.raises(StormError, match=r"the trained model is in .*stage/final"):
        check_model_dir(tmp_path / "stage")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(StormError, match="model_type is 'llama'"):
        check_model_dir(tmp_path / "x")


def test_weights_are_read_from_safetensors_never_from_a_pickle(qwen2_mamba_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = shutil.copytree(qwen2_mamba_dir, tmp_path / "pickled")
    (weights,) = folder.glob("*.safetensors")
    torch.save(load_file(weights), folder / "pytorch_model.bin")  # the same weights, pickled
    weights.unlink()
    with pytest.raises(StormError, match=r"pickled.*cannot load the model.*safetensors"):
        load_model(folder, "cpu", "float32")


def test_predictor_renders_and_tokenizes_each_request_once(qwen2_mamba_dir, monkeypatch):
    model, processor = load_model(qwen2_mamba_dir, "cpu", "float32")
    predictor = Predictor(model, processor, max_new_tokens=3)
    calls = {"render": 0, "tokenize": 0}
    render, tokenize = processor.apply_chat_template, processor.tokenizer.__call__
    monkeypatch.setattr(processor, "apply_chat_template",
                        lambda *a, **k: calls.__setitem__("render", calls["render"] + 1) or render(*a, **k))
    monkeypatch.setattr(type(processor.tokenizer), "__call__",
                        lambda self, *a, **k: calls.__setitem__("tokenize", calls["tokenize"] + 1) or tokenize(*a, **k))
    text = predictor.reply("What colour?", random_video(4))
    assert calls == {"render": 1, "tokenize": 1}
    assert isinstance(text, str) and predictor.last_timing["generate_s"] >= predictor.last_timing["prefill_s"] > 0


def test_greedy_is_greedy_whatever_penalty_the_generation_config_carries(qwen2_mamba_dir):
    """A built model keeps its LLM's generation config (Qwen2-Instruct's repetition_penalty 1.05);
    evaluation, chat and the server's greedy answers must not apply it behind the stated decoding."""
    from storm_vlm.serve.engine import SamplingParams

    predictor = Predictor.from_pretrained(qwen2_mamba_dir, "cpu", "float32", max_new_tokens=12)
    inputs = predictor.encode(predictor.render(build_messages("What colour?")), [random_video(4, seed=7)])
    plain = predictor.generate(inputs).token_ids
    config = predictor.model.generation_config
    config.repetition_penalty = 0.01  # below 1: tokens already seen win, so the answer would change
    try:
        with torch.inference_mode():
            penalised = predictor.model.generate(**inputs, do_sample=False, max_new_tokens=12, min_new_tokens=12)
        assert penalised[0, inputs["input_ids"].shape[1]:].tolist() != plain  # the config's penalty would show
        assert predictor.generate(inputs).token_ids == plain
        assert SamplingParams(temperature=0).generate_kwargs()["repetition_penalty"] == 1.0
        assert SamplingParams(temperature=0.7).generate_kwargs()["repetition_penalty"] == 1.0
    finally:
        config.repetition_penalty = 1.0


def test_predictor_generate_reports_tokens_and_counts(qwen2_mamba_dir):
    predictor = Predictor.from_pretrained(qwen2_mamba_dir, "cpu", "float32", max_new_tokens=4)
    prompt = predictor.render(build_messages("What colour?"))
    inputs = predictor.encode(prompt, [random_video(4)], temporal_sample_stride=2)
    reply = predictor.generate(inputs)
    assert reply.visual_tokens == predictor.visual_tokens(4, 2) == model_tokens(predictor, 4, 2)
    assert reply.prompt_tokens == predictor.text_tokens(prompt) + reply.visual_tokens
    assert 1 <= len(reply.token_ids) <= 4


def model_tokens(predictor, frames, stride):
    return predictor.model.config.num_visual_tokens(frames, stride)


BF16_CPU = (torch.float32, torch.bfloat16, torch.bfloat16)  # weights, autocast, the LLM's linear layers


@pytest.mark.parametrize("name,fast,want", [
    ("float32", True, (torch.float32, None, None)), ("fp32", False, (torch.float32, None, None)),
    ("bfloat16", False, BF16_CPU), ("bf16", True, BF16_CPU),
    ("auto", True, BF16_CPU), ("auto", False, (torch.float32, None, None)),
])
def test_precision_on_cpu(monkeypatch, name, fast, want):
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: fast)
    got = P.resolve_precision(name, "cpu")
    assert (got.weights, got.autocast, got.llm_linears) == want
    assert got.name in P.PRECISIONS


def test_precision_refusals_and_spellings():
    assert [P.parse_precision(x) for x in ("fp16", "bf16", "fp32", "auto")] == ["float16", "bfloat16", "float32", "auto"]
    with pytest.raises(StormError, match="not used on CPU"):
        P.resolve_precision("float16", "cpu")
    with pytest.raises(StormError, match="precision must be one of auto, float32, bfloat16, float16"):
        P.parse_precision("int8")
    assert (P.resolve_precision("bfloat16", "cpu").describe()
            == "float32 weights (the LLM's linear layers bfloat16), bfloat16 autocast")


def test_every_command_shares_the_precision_flag():
    from storm_vlm.cli import build_parser

    for command in ("chat", "eval", "serve", "web", "profile"):
        parser = build_parser(command)
        argv = [command, "x"] + {"eval": ["--benchmark", "synthetic", "--data-root", "d", "--output", "o"],
                                 "chat": ["v.mp4", "-q", "?"]}.get(command, [])
        if command == "profile":
            argv = [command, "--config", "c.yaml", "--output", "o"]
        args = parser.parse_args(argv + ["--dtype", "bf16"])
        assert args.precision == "bfloat16", command


def _stored_in_bf16(model, module) -> bool:
    """An nn.Linear of the LLM not tied to its embedding table."""
    lm = model.language_model
    return isinstance(module, torch.nn.Linear) and module.weight is not lm.get_input_embeddings().weight


def test_bfloat16_precision_on_cpu_stores_the_llms_linear_layers_in_bf16(qwen2_mamba_dir):
    """The loader keeps the LLM's linear layers in bf16 under the CPU bfloat16 precision (half their
    memory; what autocast would cast them to), every other weight in float32, and the model runs under
    its autocast even when called without it: the same tokens as float32 weights holding the same
    values under autocast."""
    model, processor = load_model(qwen2_mamba_dir, "cpu", P.resolve_precision("bfloat16", "cpu"))
    lm_linears = {id(p) for m in model.language_model.modules() if _stored_in_bf16(model, m) for p in m.parameters()}
    assert lm_linears
    for name, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if id(p) in lm_linears else torch.float32), name
    ref, _ = load_model(qwen2_mamba_dir, "cpu", "float32")
    for m in ref.language_model.modules():
        if _stored_in_bf16(ref, m):
            m.to(torch.bfloat16).to(torch.float32)
    predictor = Predictor(model, processor, max_new_tokens=8)  # no precision given: the model brings its own
    inputs = predictor.encode(predictor.render(build_messages("What colour?")), [random_video(4)])
    got = predictor.generate(inputs).token_ids
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert got == want.tolist()[:len(got)] and len(got) >= 1


def test_preparing_a_prepared_model_again_changes_nothing(qwen2_mamba_dir):
    from storm_vlm.inference import prepare_for_inference

    bf16 = P.resolve_precision("bfloat16", "cpu")
    model, _ = load_model(qwen2_mamba_dir, "cpu", bf16)
    before = {name: (p.data_ptr(), p.dtype) for name, p in model.named_parameters()}
    assert prepare_for_inference(model, "cpu", bf16) is model
    assert {name: (p.data_ptr(), p.dtype) for name, p in model.named_parameters()} == before


def test_a_videos_next_question_continues_from_the_kept_cache(qwen2_mamba_dir, monkeypatch):
    """Questions about the same frames (another array of them) encode and prefill the video once;
    the answers are those computed from scratch; other frames start over."""
    model, processor = load_model(qwen2_mamba_dir, "cpu", "float32")
    video = random_video(4, seed=21)
    questions = ["What colour is the square?", "Where is it?", "How many squares are there?"]
    prefilled, encoded = [], []
    llm, encode = model.language_model.forward, model._vision_features
    monkeypatch.setattr(model.language_model, "forward",
                        lambda *a, **k: (k["inputs_embeds"].shape[1] > 1 and prefilled.append(k["inputs_embeds"].shape[1]))
                        or llm(*a, **k))
    monkeypatch.setattr(model, "_vision_features", lambda frames: encoded.append(len(frames)) or encode(frames))
    reusing = Predictor(model, processor, max_new_tokens=4)
    replies = [reusing.reply(q, video.copy()) for q in questions]
    assert sum(encoded) == 4 and max(prefilled[1:]) < processor.num_visual_tokens(4)
    scratch = Predictor(model, processor, max_new_tokens=4, reuse_prefix=False)
    assert [scratch.reply(q, video) for q in questions] == replies
    assert sum(encoded) == 4 + 3 * 4
    reusing.reply(questions[0], random_video(4, seed=22))  # other frames: encoded, the whole prompt prefilled
    assert sum(encoded) == 5 * 4 and prefilled[-1] > processor.num_visual_tokens(4)


def test_a_batch_encodes_a_video_asked_about_twice_once(qwen2_mamba_dir, monkeypatch):
    model, processor = load_model(qwen2_mamba_dir, "cpu", "float32")
    video, other = random_video(4, seed=23), random_video(3, seed=24)
    questions = ["What colour is the square?", "Where is it?", "Which way does it move?"]
    predictor, encoded = Predictor(model, processor, max_new_tokens=4), []
    encode = model._vision_features
    monkeypatch.setattr(model, "_vision_features", lambda frames: encoded.append(len(frames)) or encode(frames))
    shared = predictor.reply_batch(questions, [video, other, video])  # one array for two rows
    assert sum(encoded) == 4 + 3
    assert predictor.reply_batch(questions, [video, other, video.copy()]) == shared  # three encoded
    assert sum(encoded) == 2 * (4 + 3) + 4


def test_each_process_of_a_multi_process_run_takes_its_own_gpu(monkeypatch):
    """Under torchrun every rank would otherwise load its model onto GPU 0."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == resolve_device("cuda") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)] * 2  # "cuda" elsewhere in the process means it too
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device(None) == torch.device("cuda")
    assert len(current) == 2


def test_a_model_folder_whose_weights_are_cut_short_is_one_error_naming_it(qwen2_mamba_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(qwen2_mamba_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy that stopped halfway
    with pytest.raises(StormError, match=f"{copy}: cannot load the model"):
        load_model(copy, "cpu", "float32")
