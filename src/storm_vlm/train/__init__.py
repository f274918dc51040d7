"""Training: the three STORM stages (align / sft / long) on a plain torch.distributed loop.

`train(config, overrides=None, resume=False) -> Path` runs one stage (alone or under torchrun)
and returns the final model folder; `load_config(path, overrides)` validates a YAML config.
"""

from storm_vlm.train.config import TrainConfig, config_from_dict, load_config


def train(config, overrides=None, resume=False):
    """See `storm_vlm.train.trainer.train`."""
    from storm_vlm.train.trainer import train as _train

    return _train(config, overrides=overrides, resume=resume)


__all__ = ["TrainConfig", "config_from_dict", "load_config", "train"]
