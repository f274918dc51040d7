"""Model folders and media files made by someone else are read as data only: no code they name
runs (whatever a user answers when asked), no file outside a folder is read through a link, a folder
that does not load completely is refused rather than run with random weights, and a playlist is
refused as one whatever its name. Each refusal is one StormError naming the folder or file and why."""

import builtins
import json
import shutil

import jinja2
import pytest
from safetensors.torch import load_file, save_file

from storm_vlm import VideoDecodeError, load_video
from storm_vlm.builder import load_parts, read_part_configs
from storm_vlm.errors import ConfigError, StormError
from storm_vlm.inference import load_model
from storm_vlm.media.container import open_container
from storm_vlm.media.limits import Budget
from storm_vlm.train.model_source import storm_config_for_build
from storm_vlm.utils import check_model_dir
from test_video_files import FifoWatch

# A module whose import leaves a trace: what transformers would run for a folder's auto_map.
EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('code from the folder ran')\n"


def _edit(path, **fields):
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(fields)
    path.write_text(json.dumps(data))


def _copy(src, dst):
    folder = shutil.copytree(src, dst)
    (folder / "evil.py").write_text(EVIL)
    return folder


@pytest.fixture
def user_says_yes(monkeypatch):
    """Answers "y" to any question asked on the terminal (transformers' "run the custom code?")."""
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    return asked


@pytest.mark.parametrize("file,fields", [
    ("tokenizer_config.json", {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.T", None]}}),
    ("processor_config.json", {"processor_class": "EvilProcessor", "auto_map": {"AutoProcessor": "evil.P"}}),
])
def test_code_a_model_folder_names_never_runs(qwen2_mamba_dir, tmp_path, user_says_yes, file, fields):
    folder = _copy(qwen2_mamba_dir, tmp_path / "model")
    _edit(folder / file, **fields)
    with pytest.raises(StormError, match=rf"model folder .*model: {file} names Python code .*never runs"):
        load_model(folder, "cpu", "float32")
    assert not (folder / "RAN").exists() and user_says_yes == []


@pytest.mark.parametrize("part,file,fields", [
    ("vision", "config.json", {"model_type": "evil", "auto_map": {"AutoConfig": "evil.C"}}),
    ("vision", "preprocessor_config.json",
     {"image_processor_type": "EvilIP", "auto_map": {"AutoImageProcessor": "evil.I"}}),
    ("llm", "config.json", {"model_type": "evil", "auto_map": {"AutoConfig": "evil.C"}}),
])
def test_build_never_runs_code_a_part_folder_names(qwen2_parts, tmp_path, user_says_yes, part, file, fields):
    folders = {"vision": _copy(qwen2_parts[0], tmp_path / "vision"), "llm": _copy(qwen2_parts[1], tmp_path / "llm")}
    _edit(folders[part] / file, **fields)
    label = "vision" if part == "vision" else "LLM"
    with pytest.raises(StormError, match=rf"{label} folder .*{part}: {file} names Python code"):
        load_parts(folders["vision"], folders["llm"])
    assert not (folders[part] / "RAN").exists() and user_says_yes == []
    if file == "config.json":  # a training config's build: source reads the same configs
        with pytest.raises(ConfigError, match=rf"key 'build.{'vision' if part == 'vision' else 'llm'}'.*never runs"):
            storm_config_for_build({"vision": str(folders["vision"]), "llm": str(folders["llm"])})
        assert not (folders[part] / "RAN").exists()


def test_a_link_out_of_a_model_folder_is_refused(qwen2_mamba_dir, qwen2_parts, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the prompt")
    folder = shutil.copytree(qwen2_mamba_dir, tmp_path / "model")
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.jinja").symlink_to(secret)  # would be rendered into every prompt
    with pytest.raises(StormError, match=r"chat_template.jinja is a symbolic link to .*secret.txt, outside the folder"):
        load_model(folder, "cpu", "float32")
    llm = shutil.copytree(qwen2_parts[1], tmp_path / "llm")
    (llm / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    (llm / "tokenizer.json").symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(StormError, match=r"LLM folder .*llm: tokenizer.json is a symbolic link"):
        read_part_configs(qwen2_parts[0], llm)


def test_links_inside_a_folder_and_hugging_face_cache_snapshots_are_fine(qwen2_mamba_dir, tmp_path):
    repo = tmp_path / "hub" / "models--me--storm"
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, src in enumerate(sorted(qwen2_mamba_dir.iterdir())):  # the cache's layout: snapshot files link to blobs
        shutil.copy(src, repo / "blobs" / f"blob{i}")
        (snapshot / src.name).symlink_to(f"../../blobs/blob{i}")
    (snapshot / "alias.json").symlink_to(snapshot / "config.json")
    (tmp_path / "linked").symlink_to(snapshot)  # the folder itself may be a link
    assert check_model_dir(tmp_path / "linked") == tmp_path / "linked"
    model, processor = load_model(snapshot, "cpu", "float32")
    assert processor.chat_template
    # weights kept on other storage: a linked *.safetensors is read (tensors, header checked)
    folder = shutil.copytree(qwen2_mamba_dir, tmp_path / "model")
    (folder / "model.safetensors").rename(tmp_path / "shared.safetensors")
    (folder / "model.safetensors").symlink_to(tmp_path / "shared.safetensors")
    load_model(folder, "cpu", "float32")


def _without_one_weight(src, dst):
    folder = shutil.copytree(src, dst)
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(weights)[5]
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, dropped


def test_a_folder_missing_weights_is_refused_not_run_with_random_ones(qwen2_mamba_dir, tmp_path):
    folder, dropped = _without_one_weight(qwen2_mamba_dir, tmp_path / "model")
    with pytest.raises(StormError, match=rf"model folder .*model: the checkpoint lacks 1 weights \({dropped}\)"):
        load_model(folder, "cpu", "float32")


def test_a_folder_whose_files_do_not_fit_storm_is_one_clear_error(qwen2_mamba_dir, tmp_path):
    folder = shutil.copytree(qwen2_mamba_dir, tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["image_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(StormError, match=r"edited: cannot load the model \(its weights do not fit its config.json\)"):
        load_model(folder, "cpu", "float32")

    folder = shutil.copytree(qwen2_mamba_dir, tmp_path / "other-processor")
    _edit(folder / "processor_config.json", processor_class="LlavaProcessor")
    with pytest.raises(StormError, match=r"makes a LlavaProcessor, not a StormProcessor"):
        load_model(folder, "cpu", "float32")

    folder = shutil.copytree(qwen2_mamba_dir, tmp_path / "absurd-tokenizer")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["zzzz"] = 2**40
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(StormError, match=r"absurd-tokenizer: cannot load the model"):
        load_model(folder, "cpu", "float32")


def test_chat_templates_render_in_a_sandbox(qwen2_mamba_dir):
    _, processor = load_model(qwen2_mamba_dir, "cpu", "float32")
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    for escape in ("{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__.os.popen('id').read() }}"):
        with pytest.raises(jinja2.exceptions.SecurityError):
            processor.apply_chat_template(messages, chat_template=escape, tokenize=False)


@pytest.mark.parametrize("name,text,what", [
    ("clip.mp4", "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{target}\n#EXT-X-ENDLIST\n",
     "an HLS playlist (m3u8)"),
    ("clip.mp4", '<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static"><Period>'
                 "<AdaptationSet><Representation id=\"1\" bandwidth=\"1\"><BaseURL>file:{target}</BaseURL>"
                 "</Representation></AdaptationSet></Period></MPD>\n", "a DASH manifest"),
    ("stream.sdp", "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 5004 RTP/AVP 96\n",
     "an SDP session description"),
])
def test_a_reference_format_is_named_whatever_the_file_is_called(tmp_path, name, text, what):
    target = tmp_path / "secret.ts"
    path = tmp_path / name
    path.write_text(text.format(target=target))
    with FifoWatch(target) as watch:
        with pytest.raises(VideoDecodeError) as info:
            load_video(path, num_frames=2)
    assert not watch.opened, "a file the playlist names was opened"
    assert str(info.value).startswith(f"{path}: is {what}, which refers to other files or streams")


def test_callers_cannot_lift_the_demuxer_allow_list(tmp_path):
    target = tmp_path / "secret.ts"
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{target}\n#EXT-X-ENDLIST\n")
    with FifoWatch(target) as watch:
        with pytest.raises(VideoDecodeError, match="HLS playlist"):
            open_container(str(playlist), Budget(str(playlist), 5.0, None),
                           options={"format_whitelist": "hls,mpegts", "protocol_whitelist": "file,http"})
    assert not watch.opened, "the playlist's segment was opened"
