"""Training: the configuration (config.py) and its recipes (presets.py), the run built before its first
step (setup.py), the loop (loop.py: the file to read first), what stops a run (faults.py), and the
command (command.py). `python -m crate.train` is `crate train`, for torchrun."""

from .command import main, resolve_config
from .config import ConfigError, TrainConfig
from .faults import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteStepsError, PreemptedError
from .loop import train
from .presets import PRESETS
from .setup import build_model

__all__ = [
    "EXIT_NONFINITE",
    "EXIT_PREEMPTED",
    "PRESETS",
    "ConfigError",
    "NonFiniteStepsError",
    "PreemptedError",
    "TrainConfig",
    "build_model",
    "main",
    "resolve_config",
    "train",
]
