"""Test-session set-up and the fixtures many test modules share (tiny parts and STORM model folders,
each built once per session)."""

import os

import pytest
import torch

from helpers import SERVE_FRAMES

from storm_vlm.builder import build_storm, save_storm
from storm_vlm.demo.tiny import make_tiny_parts
from storm_vlm.model import decode
from storm_vlm.model.ssm import cpu_kernel

# Tests are small: one intra-op thread keeps them deterministic and fair on a shared 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _model_dir(tmp_path_factory, parts, llm: str, projector: str, **overrides):
    model, processor = build_storm(*parts, projector_type=projector, **overrides)
    return save_storm(model, processor, tmp_path_factory.mktemp(f"storm-{llm}-{projector}") / "model")


@pytest.fixture(scope="session")
def qwen2_parts(tmp_path_factory):
    """(vision_dir, llm_dir): tiny SigLIP (64 px, 8 px patches) + tiny Qwen2 with a trained tokenizer."""
    return make_tiny_parts(tmp_path_factory.mktemp("parts-qwen2"), llm="qwen2")


@pytest.fixture(scope="session")
def llama_parts(tmp_path_factory):
    return make_tiny_parts(tmp_path_factory.mktemp("parts-llama"), llm="llama")


@pytest.fixture(scope="session")
def qwen2_mamba_dir(tmp_path_factory, qwen2_parts):
    """A tiny STORM (Mamba projector, 1 layer) + Qwen2 folder: 16 visual tokens per frame."""
    return _model_dir(tmp_path_factory, qwen2_parts, "qwen2", "mamba", projector_num_layers=1)


@pytest.fixture(scope="session")
def qwen2_causal_dir(tmp_path_factory, qwen2_parts):
    """A tiny causal STORM (1 causal Mamba layer, temporal pool 2): what live video needs."""
    return _model_dir(tmp_path_factory, qwen2_parts, "qwen2", "mamba", projector_bidirectional=False,
                      projector_num_layers=1, temporal_pool_size=2)


@pytest.fixture(scope="module")
def live_engine(qwen2_causal_dir):
    """The live-video server's engine: the causal model, one request at a time."""
    from storm_vlm.serve import StormEngine

    engine = StormEngine(qwen2_causal_dir, device="cpu", precision="float32", max_batch_size=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def live_client(live_engine):
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    return TestClient(create_app(live_engine))


@pytest.fixture(scope="session")
def qwen2_mlp_dir(tmp_path_factory, qwen2_parts):
    return _model_dir(tmp_path_factory, qwen2_parts, "qwen2", "mlp")


@pytest.fixture(scope="session")
def llama_mamba_dir(tmp_path_factory, llama_parts):
    return _model_dir(tmp_path_factory, llama_parts, "llama", "mamba", projector_num_layers=1)


# The OpenAI-compatible server of a tiny STORM, for the modules that test it without fixtures of
# their own (test_serve_hardening, test_serve_conformance); a module's own `engine` / `client` win.
@pytest.fixture(scope="module")
def engine(qwen2_mamba_dir):
    from storm_vlm.serve import StormEngine

    engine = StormEngine(qwen2_mamba_dir, default_frames=SERVE_FRAMES, max_frames=16, precision="float32")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    return TestClient(create_app(engine, max_upload_mb=0.2, model_name="storm-tiny"))


@pytest.fixture
def kernel_steps(monkeypatch):
    """Records whether each decode step ran the C step (skips without a C compiler)."""
    if cpu_kernel.load_library() is None:
        pytest.skip("no C compiler: the decode step runs as tensor operations")
    monkeypatch.delenv("STORM_VLM_DECODE_KERNEL", raising=False)
    monkeypatch.delenv("STORM_VLM_ATTENTION_KERNEL", raising=False)
    ran = []
    real = decode.DecodeStep._kernel_step

    def recorded(self, *a):
        logits = real(self, *a)
        ran.append(logits is not None)
        return logits
    monkeypatch.setattr(decode.DecodeStep, "_kernel_step", recorded)
    return ran
