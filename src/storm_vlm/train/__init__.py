"""Training: the three STORM stages (align / sft / long) on accelerate (DDP / FSDP2 under torchrun).

`train(config, overrides=None, resume=False, dataset_wrapper=None) -> Path` runs one stage (alone
or under torchrun) and returns the final model folder; `load_config(path, overrides)` validates a YAML config.
"""

from storm_vlm.train.config import TrainConfig, config_from_dict, load_config
from storm_vlm.train.trainer import train


__all__ = ["TrainConfig", "config_from_dict", "load_config", "train"]
