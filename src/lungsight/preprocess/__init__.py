"""Pixels in a documented unit -> model-ready tensors: windowing, slice selection, resizing, augmentation."""

from lungsight.preprocess.selection import SliceSelection, select_slices
from lungsight.preprocess.transforms import fit_square, model_batch
from lungsight.preprocess.window import LUNG_WINDOW, to_unit

__all__ = ["LUNG_WINDOW", "SliceSelection", "fit_square", "model_batch", "select_slices", "to_unit"]
