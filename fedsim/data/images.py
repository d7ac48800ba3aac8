"""Image datasets from their published formats: MNIST-style IDX files and CIFAR-10.

Every reader checks what it reads (magic numbers, sizes, labels, image sizes) and names
the file that is wrong.
"""

from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np

from fedsim.data.dataset import IMAGE, Dataset, check_labels
from fedsim.errors import FedsimError

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)
CIFAR_CLASSES = 10
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


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
    held = len(raw) - (4 + 4 * ndim)
    # exact Python ints: np.prod of a forged header's sizes wraps around 64 bits
    if held != math.prod(shape):
        raise FedsimError(
            f"{path}: header says {shape} but holds {held} values; the file is "
            "truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_path(data_dir: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FedsimError(f"{data_dir}: missing {stem}[.gz]; point data-dir at the folder holding it")


def load_mnist_like(data_dir: Path | None, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST from the four standard IDX files in ``data_dir``."""
    if data_dir is None:
        raise FedsimError(f"dataset {name} needs data-dir: the folder with its four IDX files")
    paths = {key: _idx_path(data_dir, stem) for key, stem in IDX_FILES.items()}
    arrays = {key: read_idx(p, ndim=3 if key.startswith("x") else 1) for key, p in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise FedsimError(
                f"{paths[f'y_{split}']}: {len(y)} labels for {len(x)} images in "
                f"{paths[f'x_{split}'].name}; the files do not belong together"
            )
        check_labels(y, 10, paths[f"y_{split}"])
        _check_size(paths[f"x_{split}"], x.shape[1:], (28, 28), name)
    norm = {k: v.astype(np.int64) for k, v in arrays.items() if k.startswith("y")}
    for k in ("x_train", "x_test"):
        norm[k] = _normalize(arrays[k], MNIST_MEAN, MNIST_STD)[:, None]  # (N, 1, 28, 28)
    shape = tuple(norm["x_train"].shape[1:])
    return Dataset(
        name, norm["x_train"], norm["y_train"], norm["x_test"], norm["y_test"], 10, shape
    )


def _check_size(path: Path, size: tuple[int, ...], wanted: tuple[int, int], name: str) -> None:
    """One error line unless ``path``'s images are ``wanted`` (height, width)."""
    if tuple(size) != wanted:
        raise FedsimError(
            f"{path}: images are {size[-1]}×{size[-2]}, but {name} images are "
            f"{wanted[1]}×{wanted[0]} (what its models are built for); download {name} again"
        )


def load_mnist(data_dir: Path | None) -> Dataset:
    """MNIST from its four IDX files."""
    return load_mnist_like(data_dir, "mnist")


def load_fashion_mnist(data_dir: Path | None) -> Dataset:
    """Fashion-MNIST from its four IDX files."""
    return load_mnist_like(data_dir, "fashion-mnist")


def load_cifar10(data_dir: Path | None) -> Dataset:
    """CIFAR-10 from the official python pickles or from ``train/<class>/*.jpg`` folders.

    ``data_dir`` holds ``data_batch_1..5`` and ``test_batch``, or ``train/`` and
    ``test/`` with one folder per class (sorted names give the class ids, which for
    CIFAR-10's names is its official order); either may sit one level down in
    ``cifar-10-batches-py/`` or ``CIFAR-10-images/`` as the archives unpack.
    """
    if data_dir is None:
        raise FedsimError("dataset cifar10 needs data-dir: the folder with its pickles or images")
    for folder in (data_dir, data_dir / "cifar-10-batches-py", data_dir / "CIFAR-10-images"):
        if (folder / CIFAR_TEST[0]).is_file():
            (x_train, y_train), (x_test, y_test) = (
                read_cifar_pickles(folder, names) for names in (CIFAR_TRAIN, CIFAR_TEST)
            )
            break
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            classes = _class_folders(folder / "train")
            x_train, y_train = read_image_folder(folder / "train", classes)
            x_test, y_test = read_image_folder(folder / "test", classes)
            for split, x in (("train", x_train), ("test", x_test)):
                _check_size(folder / split, x.shape[2:], (32, 32), "cifar10")
            break
    else:
        raise FedsimError(
            f"{data_dir}: no CIFAR-10 here; expected data_batch_1..5 and test_batch, "
            "or train/<class>/ and test/<class>/ image folders"
        )
    x_train, x_test = (
        _normalize(x, CIFAR_MEAN[:, None, None], CIFAR_STD[:, None, None])
        for x in (x_train, x_test)
    )
    shape = tuple(x_train.shape[1:])
    return Dataset("cifar10", x_train, y_train, x_test, y_test, CIFAR_CLASSES, shape, IMAGE)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a data file must not run code."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes  # how protocol 2 writes bytes, not the real codec call
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _latin1_bytes(*args: object) -> bytes:
    """``_codecs.encode(text, "latin1")``, the one call pickle protocol 2 makes for bytes.

    Python 3's ``pickle.dump(..., protocol=2)`` writes each bytes object (an array's
    buffer, a ``b"data"`` key) as that call; any other codec or argument is refused.
    """
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode{_short(args)}")
    return args[0].encode("latin-1")


def _short(args: tuple[object, ...]) -> str:
    text = repr(args)
    return text if len(text) <= 60 else f"{text[:57]}..."


def read_cifar_pickles(folder: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10 batch pickles into uint8 images (N, 3, 32, 32) and int64 labels."""
    xs, ys = [], []
    for name in names:
        path = folder / name
        try:
            with path.open("rb") as fh:
                batch = _ArrayUnpickler(fh, encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except FileNotFoundError:
            raise FedsimError(f"{path}: missing; CIFAR-10 needs {', '.join(names)}") from None
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
            raise FedsimError(f"{path}: not a CIFAR-10 batch pickle ({e})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise FedsimError(
                f"{path}: expected N rows of 3072 bytes and N labels, got data "
                f"{data.shape} and {len(labels)} labels"
            )
        check_labels(labels, CIFAR_CLASSES, path)
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _class_folders(root: Path) -> tuple[str, ...]:
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if len(classes) != CIFAR_CLASSES:
        raise FedsimError(
            f"{root}: expected {CIFAR_CLASSES} class folders, found {len(classes)}: "
            f"{', '.join(classes) or 'none'}"
        )
    return classes


def read_image_folder(root: Path, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Read ``root/<class>/*`` images into uint8 (N, C, H, W) and int64 labels."""
    from PIL import Image, UnidentifiedImageError

    images, labels, size = [], [], None
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FedsimError(f"{root / cls}: no .jpg or .png images; is the layout train/<class>/")
        for path in files:
            try:
                with Image.open(path) as img:
                    pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
            except (OSError, UnidentifiedImageError) as exc:
                raise FedsimError(f"{path}: not a readable image ({exc})") from None
            if size is None:
                size = pixels.shape
            elif pixels.shape != size:
                raise FedsimError(
                    f"{path}: image is {pixels.shape[1]}×{pixels.shape[0]}, "
                    f"the others are {size[1]}×{size[0]}; all images must have one size"
                )
            images.append(pixels)
            labels.append(label)
    x = np.stack(images).transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64)


def _normalize(x: np.ndarray, mean: np.ndarray | float, std: np.ndarray | float) -> np.ndarray:
    """``(x / 255 - mean) / std`` as float32; ``mean`` and ``std`` broadcast over one image.

    In place, one multiply and one subtract: the textbook expression makes full-size
    temporaries (50,000 CIFAR images are 600 MB) and is 10× slower, and every simulation
    worker loads the data at start-up.
    """
    mean64, std64 = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    scaled = x.astype(np.float32)
    scaled *= (1.0 / (255.0 * std64)).astype(np.float32)
    scaled -= (mean64 / std64).astype(np.float32)
    return scaled
