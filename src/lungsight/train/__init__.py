"""Training: patient-grouped cross-validation and final fits, on the same inputs prediction uses."""

from lungsight.train.trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
