"""Dataset registry: each loader returns train and held-out test arrays in memory.

Loaders read only from the paths they are given (``data-dir``); nothing is downloaded
at run time. ``digits`` ships inside scikit-learn and is the embedded default.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.errors import FedsimError

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class Dataset:
    """Arrays of one dataset, split into train and held-out test.

    ``x_*`` have shape (N, *input_shape); ``y_*`` are int64 class ids in [0, num_classes).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]


def load_digits(data_dir: Path | None = None) -> Dataset:
    """Load scikit-learn's 8×8 digits with a fixed stratified 80/20 split.

    The split does not depend on the experiment seed, so runs with different seeds are
    evaluated on the same 360 test images.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, 10, (1, 8, 8))


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read one IDX file (gzipped or not), checking its magic number and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise FedsimError(f"{path}: cannot read ({exc}); replace the file") from None
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise FedsimError(f"{path}: not an IDX file of {ndim} dimension(s) of bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise FedsimError(
            f"{path}: header says {shape} but holds {body.size} values; the file is "
            "truncated or corrupt, download it again"
        )
    return body.reshape(shape)


def _idx_path(data_dir: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FedsimError(f"{data_dir}: missing {stem}[.gz]; point data-dir at the folder holding it")


def load_mnist_like(data_dir: Path | None, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST from the four standard IDX files in ``data_dir``."""
    if data_dir is None:
        raise FedsimError(f"dataset {name} needs data-dir: the folder with its four IDX files")
    arrays = {
        key: read_idx(_idx_path(data_dir, stem), ndim=3 if key.startswith("x") else 1)
        for key, stem in IDX_FILES.items()
    }
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise FedsimError(f"{data_dir}: {split} has {len(x)} images but {len(y)} labels")
        if y.max(initial=0) > 9:
            raise FedsimError(f"{data_dir}: {split} labels outside 0..9; wrong label file?")
    norm = {
        k: ((v.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD)[:, None]  # (N, 1, 28, 28)
        if k.startswith("x")
        else v.astype(np.int64)
        for k, v in arrays.items()
    }
    shape = tuple(norm["x_train"].shape[1:])
    return Dataset(
        name, norm["x_train"], norm["y_train"], norm["x_test"], norm["y_test"], 10, shape
    )


DATASETS: dict[str, Callable[[Path | None], Dataset]] = {
    "digits": load_digits,
    "mnist": load_mnist_like,
    "fashion-mnist": lambda data_dir: load_mnist_like(data_dir, "fashion-mnist"),
}


def load_dataset(name: str, data_dir: str | Path = "") -> Dataset:
    """Load a registered dataset by name, from ``data_dir`` where it needs files."""
    path = Path(data_dir).expanduser() if str(data_dir) else None
    if path is not None and not path.is_dir():
        raise FedsimError(f"data-dir {path} is not a folder; set data-dir to an existing folder")
    return DATASETS[name](path)
