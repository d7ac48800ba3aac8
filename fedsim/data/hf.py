"""Hugging Face datasets (optional extra ``hf``): ``hf-image`` and ``hf-text``.

``data-dir`` is either a folder written by ``datasets``' ``save_to_disk`` (read offline
with ``load_from_disk``) or ``hf:<owner>/<name>``, loaded through ``flwr-datasets``'
``FederatedDataset``, which downloads from the hub (or reads a local folder of data
files, ``hf:/path``). Only the whole splits are taken from it; fedsim's own
partitioners split them among clients, seeded as for every other dataset.

Columns are found by their features: the label is the ``ClassLabel`` column (else one
named ``label`` or ``labels``); the input is the ``Image`` column for ``hf-image`` and
the first string column for ``hf-text``. Without a ``test`` split, a fixed stratified
20% of ``train`` is held out.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.dataset import HF_PREFIX, Dataset, check_labels
from fedsim.data.split import stratified_split
from fedsim.data.text import text_dataset
from fedsim.errors import FedsimError
from fedsim.registry import IMAGE, TEXT_CLASSIFICATION

# the extra's one package, into this interpreter: "pip install 'fedsim[hf]'" would fetch
# PyPI's "fedsim", another project of the same name
EXTRA = f"{shlex.quote(sys.executable)} -m pip install 'flwr-datasets>=0.6,<0.7'"


def load_hf_image(data_dir: Path | None) -> Dataset:
    """``hf-image``: an image-classification dataset of the Hugging Face format."""
    return load_hf(data_dir, task=IMAGE)


def load_hf_text(data_dir: Path | None) -> Dataset:
    """``hf-text``: a text-classification dataset of the Hugging Face format."""
    return load_hf(data_dir, task=TEXT_CLASSIFICATION)


def load_hf(data_dir: Path | None, *, task: str) -> Dataset:
    """Train and test splits of a Hugging Face dataset, as a ``Dataset`` for ``task``."""
    name = "hf-image" if task == IMAGE else "hf-text"
    if data_dir is None:
        raise FedsimError(
            f"dataset {name} needs data-dir: a folder saved with save_to_disk, or "
            "hf:<owner>/<name> for the Hugging Face hub"
        )
    train, test = _splits(str(data_dir))
    label = _label_column(train, data_dir)
    if task == IMAGE:
        column = _column(train, data_dir, "Image", "an image")
        x_train, x_test = _images(train[column], data_dir), _images(test[column], data_dir)
    else:  # texts as an object array, split like images, tokenized below
        column = _column(train, data_dir, "string", "a text")
        x_train = np.asarray(list(train[column]), dtype=object)
        x_test = np.asarray(list(test[column]), dtype=object)
    y_train = np.asarray(train[label], dtype=np.int64)
    y_test = np.asarray(test[label], dtype=np.int64)
    if test is train:
        x_train, x_test, y_train, y_test = stratified_split(x_train, y_train)
    # what the model's shape and the inputs' scale come from is public: the class count
    # of a ClassLabel, or else the held-out labels, and the held-out images' statistics;
    # from the training split one example could set them, outside any ε
    num_classes = _num_classes(train.features[label], y_test)
    for y in (y_train, y_test):
        check_labels(y, num_classes, data_dir)
    if task == IMAGE:
        mean = x_test.mean(axis=(0, 2, 3), keepdims=True)
        std = x_test.std(axis=(0, 2, 3), keepdims=True) + 1e-6
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        shape = tuple(x_train.shape[1:])
        return Dataset(name, x_train, y_train, x_test, y_test, num_classes, shape, IMAGE)
    return text_dataset(name, (list(x_train), y_train), (list(x_test), y_test), num_classes)


def _splits(source: str) -> tuple[Any, Any]:
    """(train, test) splits; ``test is train`` when the dataset has no test split."""
    try:
        import datasets
    except ImportError:
        raise FedsimError(f"Hugging Face datasets need the optional extra: {EXTRA}") from None
    if source.startswith(HF_PREFIX):
        splits = _hub_splits(source.removeprefix(HF_PREFIX))
    else:
        try:
            loaded = datasets.load_from_disk(source)
        except (FileNotFoundError, ValueError) as exc:
            raise FedsimError(f"{source}: not a dataset saved with save_to_disk ({exc})") from None
        splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if "train" not in splits:
        raise FedsimError(f"{source}: no 'train' split (found {', '.join(splits)})")
    return splits["train"], splits.get("test", splits["train"])


def _hub_splits(repo: str) -> dict[str, Any]:
    try:
        from flwr_datasets import FederatedDataset
    except ImportError:
        raise FedsimError(f"hf:{repo} needs flwr-datasets, the optional extra: {EXTRA}") from None
    # one partition of the whole split: fedsim partitions it itself, seeded
    fds = FederatedDataset(dataset=repo, partitioners={"train": 1}, shuffle=False)
    try:
        splits = {"train": fds.load_split("train")}
    except Exception as exc:  # network, hub and format errors all end the run here
        raise FedsimError(f"hf:{repo}: cannot load ({type(exc).__name__}: {exc})") from None
    with contextlib.suppress(ValueError):  # no test split: hold out part of train
        splits["test"] = fds.load_split("test")
    return splits


def _label_column(split: Any, source: Path) -> str:
    for column, feature in split.features.items():
        if type(feature).__name__ == "ClassLabel":
            return column
    for column in ("label", "labels"):
        if column in split.features:
            return column
    raise FedsimError(f"{source}: no label column (a ClassLabel, or one named label)")


def _num_classes(feature: Any, held_out: np.ndarray) -> int:
    """A ClassLabel's class count, else one more than the largest held-out label."""
    if hasattr(feature, "num_classes"):
        return int(feature.num_classes)
    return int(np.max(held_out)) + 1


def _column(split: Any, source: Path, kind: str, what: str) -> str:
    for column, feature in split.features.items():
        if type(feature).__name__ == kind or getattr(feature, "dtype", None) == kind:
            return column
    raise FedsimError(f"{source}: no {what} column (features: {dict(split.features)})")


def _images(images: Any, source: Path) -> np.ndarray:
    """PIL images -> float32 (N, C, H, W) in [0, 1]; grey stays one channel."""
    pixels = []
    for img in images:
        mode = "L" if img.mode in ("L", "1", "I", "F") else "RGB"
        pixels.append(np.asarray(img.convert(mode), dtype=np.uint8))
    if len({p.shape for p in pixels}) > 1:
        raise FedsimError(f"{source}: images have different sizes; all must have one size")
    x = np.stack(pixels).astype(np.float32) / 255.0
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
