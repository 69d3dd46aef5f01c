"""The main job: data -> tokens -> transformers.Trainer -> adapter on disk; evaluation; the built-in task.

Nothing in the library core imports this package; it needs the ``train`` extras
(accelerate, datasets, gguf, matplotlib, pyyaml, tqdm).
"""

from .config import TrainConfig, config_from_sources
from .run import train

__all__ = ["TrainConfig", "config_from_sources", "train"]
