"""Training: the three STORM stages (align / sft / long) on accelerate (DDP / FSDP2 under torchrun).

`train(config, overrides=None, resume=False, dataset_wrapper=None) -> Path` runs one stage (alone
or under torchrun) and returns the final model folder; `load_config(path, overrides)` validates a YAML config.
"""

from storm_vlm.train.config import TrainConfig, config_from_dict, load_config


def train(config, overrides=None, resume=False, dataset_wrapper=None):
    """See `storm_vlm.train.trainer.train`."""
    from storm_vlm.train.trainer import train as _train

    return _train(config, overrides=overrides, resume=resume, dataset_wrapper=dataset_wrapper)


__all__ = ["TrainConfig", "config_from_dict", "load_config", "train"]
