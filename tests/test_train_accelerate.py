"""The trainer runs on accelerate: the Accelerator owns the process set-up, the model wrapping,
backward and clipping; our sampler and loader are left untouched; bf16 only where the CPU has it."""

import logging

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler

from storm_vlm.train.config import config_from_dict
from storm_vlm.train.launch import end_accelerator, make_accelerator, mixed_precision
from storm_vlm.train.trainer import StepBatchSampler, Trainer
from train_helpers import base_config, make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_videos=4, num_images=2)


class CountingDataset:
    """A dataset wrapper that counts reads (what the demo's memo wrapper plugs into)."""

    def __init__(self, dataset):
        self.dataset, self.reads = dataset, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads += 1
        return self.dataset[index]


def test_the_step_runs_through_the_accelerator(data, tmp_path, monkeypatch):
    cfg = config_from_dict(base_config(tmp_path / "run", data, max_steps=2, per_device_batch_size=1,
                                       gradient_accumulation_steps=2, max_grad_norm=0.5))
    accelerator, owns_group = make_accelerator(cfg)
    try:
        trainer = Trainer(cfg, accelerator, dataset_wrapper=CountingDataset)
        trainer.setup()
        assert trainer.accelerator is accelerator
        assert accelerator.num_processes == 1 and accelerator.mixed_precision == "no"  # precision float32
        assert accelerator.device.type == "cpu" and not owns_group
        # The model the step calls is the one accelerate prepared (and tracks).
        assert getattr(trainer.wrapped, "_is_accelerate_prepared", False)
        assert any(m is trainer.wrapped for m in accelerator._models)
        assert isinstance(trainer.optimizer, AcceleratedOptimizer)
        assert isinstance(trainer.scheduler, AcceleratedScheduler)
        # Our data order is never re-sharded: a plain DataLoader over our StepBatchSampler.
        loader = trainer.make_loader()
        assert type(loader) is torch.utils.data.DataLoader
        assert isinstance(loader.batch_sampler, StepBatchSampler)
        assert isinstance(trainer.dataset, CountingDataset)

        calls = {"forward": 0, "backward": 0, "clip": 0}
        trainer.wrapped.register_forward_pre_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
        for name in ("backward", "clip_grad_norm_"):
            original = getattr(accelerator, name)

            def counted(*args, _original=original, _key=name.split("_")[0], **kwargs):
                calls[_key] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(accelerator, name, counted)
        final = trainer.train()
    finally:
        end_accelerator(accelerator, owns_group)
    assert calls == {"forward": 4, "backward": 4, "clip": 2}  # 2 steps x 2 micro-steps
    assert trainer.dataset.reads == 4
    assert (final / "model.safetensors").is_file()
    # The singletons were reset: a second run may choose another precision.
    from accelerate.state import AcceleratorState

    assert AcceleratorState._shared_state == {}


def test_bf16_only_where_the_hardware_has_it(data, tmp_path, monkeypatch, caplog):
    import storm_vlm.precision as precision

    cfg = config_from_dict(base_config(tmp_path / "run", data, bf16=True, max_steps=1))
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="storm_vlm.train"):
        assert mixed_precision(cfg, "cpu") == "no"
    assert "no native bf16" in caplog.text
    auto = config_from_dict(base_config(tmp_path / "run", data, precision="auto"))
    assert mixed_precision(auto, "cpu") == "no"  # auto: bf16 only where the CPU has it

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert mixed_precision(auto, "cpu") == "bf16"
    accelerator, owns_group = make_accelerator(cfg)
    try:
        assert accelerator.mixed_precision == "bf16"
        trainer = Trainer(cfg, accelerator)
        trainer.setup()
        seen = []
        proj = trainer.model.language_model.model.layers[0].self_attn.q_proj
        proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        batch = trainer.collator([trainer.dataset[0]])
        with torch.no_grad():
            out = trainer.wrapped(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_videos",
                                                          "video_frame_mask")})
        assert seen == [torch.bfloat16]  # accelerate's autocast runs the forward in bf16 ...
        assert out.logits.dtype == torch.float32  # ... and hands fp32 outputs back
        assert next(trainer.model.parameters()).dtype == torch.float32  # master weights stay fp32
    finally:
        end_accelerator(accelerator, owns_group)
