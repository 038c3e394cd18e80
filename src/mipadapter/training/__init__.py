"""Training MIP-Adapter with accelerate: config, data, step, loop, checkpoints, exports.

Heavy modules (accelerate, diffusers) load inside the functions that need them.
"""

from mipadapter.training.config import ConfigError, TrainConfig, config_from_dict, load_config

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config", "train"]


def __getattr__(name: str):
    if name == "train":
        from mipadapter.training.loop import train

        return train
    raise AttributeError(f"module 'mipadapter.training' has no attribute {name!r}")
