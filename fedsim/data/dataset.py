"""Datasets in memory: train and held-out test arrays, and how they are loaded.

Loaders read only from the paths they are given (``data-dir``); nothing is downloaded
at run time. ``digits`` ships inside scikit-learn and is the embedded default. File
formats live in their own modules (``images``, ``text``, ``shakespeare``, ``hf``), which
are imported only when their dataset is loaded (``fedsim.registry``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.config import FedsimConfig, check_delta, check_task
from fedsim.data.checks import check_dataset
from fedsim.data.partition import partition_dataset
from fedsim.data.split import stratified_split
from fedsim.errors import FedsimError, blamed
from fedsim.registry import (
    DATASETS,
    FOLDERLESS,
    HUB_PREFIX,
    IMAGE,
    NEXT_CHAR,
    TEXT_CLASSIFICATION,
    is_import_path,
    resolve,
)

PAD_ID, UNK_ID = 0, 1  # token ids: padding (text is right-padded), and unknown tokens
HF_PREFIX = HUB_PREFIX
DIGITS_FILE = "datasets/data/digits.csv.gz"  # inside scikit-learn


@dataclass(frozen=True)
class Dataset:
    """Arrays of one dataset, split into train and held-out test.

    ``x_*`` have shape (N, *input_shape); ``y_*`` are int64 class ids in [0, num_classes).
    Images are float32. Token ids (text tasks) are integers, ``PAD_ID`` (0) pads on the
    right and ``UNK_ID`` (1) stands for tokens outside ``vocab``; they are uint8 when
    the vocabulary fits in a byte (characters: 4 million 80-character windows then take
    330 MB, not 2.6 GB) and int64 otherwise. Models cast them to int64.

    ``client_ids`` gives each training sample's natural user (an index into ``users``,
    e.g. a speaking role) where the data has users, else None. ``vocab`` lists the
    tokens by id (``vocab[0]`` is the padding token) for text, else None.

    ``overlap``: the most training samples one piece of a user's data lies in, and what
    that piece is: ``(81, "character")`` for Shakespeare's windows, each character being
    in up to 81 of them. DP-SGD protects one sample; the run also reports the ε of such a
    group. ``(1, "sample")`` where samples share nothing; a count of 0: several, not
    counted (a count taken from the training data would publish it).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    task: str = IMAGE
    client_ids: np.ndarray | None = None
    users: tuple[str, ...] | None = None
    vocab: tuple[str, ...] | None = None
    overlap: tuple[int, str] = (1, "sample")


def load_digits(data_dir: Path | None = None) -> Dataset:
    """Load scikit-learn's 8×8 digits with a fixed stratified 80/20 split.

    The split does not depend on the experiment seed, so runs with different seeds are
    evaluated on the same 360 test images. ``lstm`` and ``transformer`` read each image
    as a sequence of its 8 rows of 8 pixels. The file is read where scikit-learn is
    installed, without importing it (2 s on its own).
    """
    data = np.loadtxt(installed_file("sklearn", DIGITS_FILE), delimiter=",")  # (1797, 65)
    x = (data[:, :-1] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # (1797, 1, 8, 8)
    y = data[:, -1].astype(np.int64)
    x_train, x_test, y_train, y_test = stratified_split(x, y)
    return Dataset("digits", x_train, y_train, x_test, y_test, 10, (1, 8, 8))


def installed_file(package: str, relative: str) -> Path:
    """A data file inside an installed ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / relative if folders else None
    if path is None or not path.is_file():
        raise FedsimError(
            f"{relative} of the package {package} is missing; reinstall it "
            f"(./install.sh, or pip install --force-reinstall {package})"
        )
    return path


def load_dataset(name: str, data_dir: str | Path = "") -> Dataset:
    """Load a dataset by name or import path (``fedsim.registry``), from ``data_dir``.

    ``hf-image`` and ``hf-text`` also take ``hf:<owner>/<name>``, a Hugging Face hub
    dataset, instead of a folder.
    """
    raw = str(data_dir)
    loader = resolve(name, DATASETS, "dataset")
    if raw.startswith(HF_PREFIX):
        if not name.startswith("hf-"):
            raise FedsimError(
                f"data-dir {raw} names a Hugging Face dataset; use dataset hf-image or hf-text"
            )
        return loader(Path(raw))
    path = Path(raw).expanduser() if raw else None
    if path is not None and not path.is_dir():
        where = "" if path.is_absolute() else f" (from {Path.cwd()})"
        raise FedsimError(
            f"data-dir {path}{where} is not a folder; set data-dir to an existing folder "
            "(--set data-dir=DIR; data_dir= in Python)"
        )
    if is_import_path(name):  # a built-in loader says what is wrong with its files itself
        with blamed(f"dataset '{name}' could not be loaded", "fix its loader"):
            dataset = loader(path)
    else:
        dataset = loader(path)
    if not isinstance(dataset, Dataset):
        raise FedsimError(
            f"dataset '{name}' returned a {type(dataset).__name__}; a dataset loader "
            "returns a fedsim.data.Dataset"
        )
    return check_dataset(dataset, name)


# set by a run's own Ray for its workers: ``[dataset, data-dir]`` (JSON), which they load
# as they start (``fedsim.clients.warm``), not when round 1's first message arrives
PRELOAD_VAR = "FEDSIM_PRELOAD_DATA"


def load_checked(config: FedsimConfig) -> Dataset:
    """``config``'s dataset, loaded and checked: its task fits the model, its partition draws.

    The built-in loaders need numpy, not torch or Flower: the ``fedsim`` command calls it
    before it starts Ray and imports the engine, so a wrong data-dir or an infeasible
    partition fails in a second, not after the 10-15 s those take.
    """
    dataset = load_dataset(config.dataset, config.data_dir)
    check_task(config, dataset.task)  # a dataset of your own states its task only now
    check_delta(config, sum(len(part) for part in partition_dataset(dataset, config)))
    return dataset


def check_node_folder(dataset: str) -> None:
    """Refuse a node's own data folder for a dataset that reads none (``digits``)."""
    if dataset in FOLDERLESS:
        raise FedsimError(
            f"dataset {dataset} reads no data-dir, so a node's own folder would be ignored "
            "and every node would train on the same examples; use a dataset that reads "
            "files (mnist, say) for data of each node's own"
        )


def check_node_data(config: FedsimConfig, folders: Sequence[Path]) -> None:
    """Deployment with a data folder per SuperNode: one each, and each holds training data.

    The run's own ``data-dir`` must load too: the server evaluates on its test split.
    Numpy only, like :func:`load_checked`, so that ``fedsim deploy`` checks before it
    imports the engine.
    """
    if len(folders) != config.num_clients:
        raise FedsimError(
            f"{len(folders)} --node-data-dir for {config.num_clients} SuperNodes; "
            "give one per SuperNode, or none"
        )
    check_node_folder(config.dataset)
    resolved = [Path(f).resolve() for f in folders]
    if len(set(resolved)) < len(resolved):
        twice = next(f for f in resolved if resolved.count(f) > 1)
        raise FedsimError(
            f"--node-data-dir {twice} is given twice: its examples would be in two clients, "
            "which each count them as their own; give every SuperNode its own folder"
        )
    check_task(config, load_dataset(config.dataset, config.data_dir).task)
    for folder in folders:
        try:
            examples = len(load_dataset(config.dataset, folder).y_train)
        except FedsimError as exc:
            raise FedsimError(f"a SuperNode's data folder: {exc}") from None
        if examples == 0:
            raise FedsimError(f"{folder} holds no training examples; give every node some data")


TOKENIZATION = {
    NEXT_CHAR: "characters: one token per character, its id its index in tokens, else <unk>",
    TEXT_CLASSIFICATION: (
        "words: lower-cased, then runs of word characters and apostrophes, or one "
        "punctuation mark (fedsim.data.text.tokenize); a word's id is 2 + its 8-byte "
        "BLAKE2b digest, little-endian, mod 8190 (fedsim.data.text.token_id), so the "
        "tokens are hash buckets, not words"
    ),
}


def vocab_record(dataset: Dataset) -> dict:
    """What turns text into this dataset's inputs: tokenization, length, ids; for vocab.json."""
    return {
        "dataset": dataset.name,
        "task": dataset.task,
        "tokenization": TOKENIZATION[dataset.task],
        "seq_len": dataset.input_shape[0],
        "padding": "right",
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "tokens": list(dataset.vocab or ()),
    }


def token_array(rows: list[int] | list[list[int]] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Token ids in the smallest dtype ``Dataset`` allows: uint8 if they fit, else int64."""
    return np.asarray(rows, dtype=np.uint8 if vocab_size <= 256 else np.int64)


def check_labels(y: np.ndarray, num_classes: int, where: Path | str) -> None:
    """Raise naming ``where`` if a label is outside ``0..num_classes-1``."""
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise FedsimError(
            f"{where}: labels outside 0..{num_classes - 1} (found {y.min()}..{y.max()}); "
            "the file is corrupt or not this dataset"
        )
