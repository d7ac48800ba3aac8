"""What every dataset must be, built-in or your own: checked once, as it is loaded.

A dataset of one's own (``dataset = "mydata:load"``) reaches training unchecked
otherwise: labels out of range fail in round 1 as an internal error, a label array one
short trains silently on misaligned pairs, and a NaN input trains silently too.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from fedsim.errors import FedsimError
from fedsim.registry import IMAGE

if TYPE_CHECKING:
    from fedsim.data.dataset import Dataset

SPLITS = ("train", "test")


def check_dataset(dataset: Dataset, name: str) -> Dataset:
    """``dataset`` if it is well formed, with floating images as float32; else one line.

    Checked: numpy arrays, as many labels as inputs (at least one of each), inputs of
    shape ``input_shape``, integer labels in ``0..num_classes-1``, finite float images,
    integer token ids within the vocabulary for text, a ``client_ids`` per training sample,
    an ``overlap`` of at least 1.
    """
    where = f"dataset '{name}'"
    if not isinstance(dataset.num_classes, int) or dataset.num_classes < 2:
        raise FedsimError(f"{where}: num_classes is {dataset.num_classes!r}; it needs 2 or more")
    arrays: dict[str, Any] = {}
    for split in SPLITS:
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise FedsimError(
                f"{where}: x_{split} and y_{split} are {type(x).__name__} and "
                f"{type(y).__name__}; give numpy arrays (np.asarray, or tensor.numpy())"
            )
        _check_split(where, split, x, y, dataset)
        if dataset.task == IMAGE and x.dtype != np.float32:
            arrays[f"x_{split}"] = x.astype(np.float32)  # numpy's default float64, say
    ids = dataset.client_ids
    if ids is not None and len(ids) != len(dataset.y_train):
        raise FedsimError(
            f"{where}: {len(ids)} client_ids for {len(dataset.y_train)} training samples; "
            "give one per training sample"
        )
    count, piece = dataset.overlap
    whole = isinstance(count, int) and not isinstance(count, bool)
    if not (whole and count >= 0 and isinstance(piece, str) and piece):
        raise FedsimError(
            f"{where}: overlap is {dataset.overlap!r}; give (how many samples one piece of "
            'data can lie in, 0 if not counted, its name), e.g. (81, "character"), or '
            '(1, "sample")'
        )
    return dataclasses.replace(dataset, **arrays) if arrays else dataset


def _check_split(where: str, split: str, x: np.ndarray, y: np.ndarray, data: Dataset) -> None:
    if len(x) != len(y) or len(y) == 0:
        raise FedsimError(
            f"{where}: {len(x)} inputs and {len(y)} labels in its {split} split; give as "
            "many labels as inputs, at least one"
        )
    if tuple(x.shape[1:]) != tuple(data.input_shape):
        raise FedsimError(
            f"{where}: x_{split} holds samples of shape {tuple(x.shape[1:])}, but its "
            f"input_shape is {tuple(data.input_shape)}; make them agree"
        )
    if y.dtype.kind not in "iu":
        raise FedsimError(f"{where}: y_{split} is {y.dtype}; labels are integer class ids")
    if y.min() < 0 or y.max() >= data.num_classes:
        raise FedsimError(
            f"{where}: y_{split} has labels {y.min()}..{y.max()}, outside "
            f"0..{data.num_classes - 1}; number the classes from 0, or raise num_classes"
        )
    if data.task == IMAGE:
        if x.dtype.kind != "f":
            raise FedsimError(
                f"{where}: x_{split} is {x.dtype}; images are floats (scale them, e.g. "
                "pixels / 255, as float32)"
            )
        if not np.isfinite(x.sum(dtype=np.float64)):  # NaN and inf carry; no (N, ...) mask
            raise FedsimError(f"{where}: x_{split} holds NaN or infinite values; remove them")
        return
    vocab = len(data.vocab or ())
    if x.dtype.kind not in "iu" or vocab == 0 or x.min() < 0 or x.max() >= vocab:
        raise FedsimError(
            f"{where}: for text, x_{split} must be integer token ids below the vocabulary's "
            f"size ({vocab}: len(vocab)); got {x.dtype} with ids "
            f"{x.min() if x.size else '-'}..{x.max() if x.size else '-'}"
        )
