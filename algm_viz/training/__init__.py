"""Training Segmenters: augmentations and the training loop."""

from .augment import Augment, class_mix, photometric, random_crop, random_flip, random_scale, resize_short_side
from .trainer import TrainConfig, TrainSet, evaluate, load_init_weights, train

__all__ = [
    "Augment",
    "TrainConfig",
    "TrainSet",
    "class_mix",
    "evaluate",
    "load_init_weights",
    "photometric",
    "random_crop",
    "random_flip",
    "random_scale",
    "resize_short_side",
    "train",
]
