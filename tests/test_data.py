import gzip

import numpy as np
import pytest

from fedsim.data import load_dataset
from fedsim.data.images import read_idx
from fedsim.errors import FedsimError


def write_idx(path, array, *, gz=False):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def fake_mnist(folder, *, gz=False, n=20):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix in ("train", "t10k"):
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz=gz
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), gz=gz)


def test_digits_is_embedded():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert set(np.unique(ds.y_train)) == set(range(10))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_plain_and_gzipped(tmp_path, gz):
    fake_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.y_test.dtype == np.int64
    assert ds.x_train.dtype == np.float32
    # the usual MNIST normalization, (pixel / 255 - 0.1307) / 0.3081, from the raw bytes
    raw = read_idx(tmp_path / f"train-images-idx3-ubyte{'.gz' if gz else ''}", ndim=3)
    expected = (raw.astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.x_train[:, 0], expected, rtol=0, atol=1e-5)


def test_truncated_idx_names_the_file(tmp_path):
    fake_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(FedsimError, match="train-images-idx3-ubyte: header says"):
        load_dataset("mnist", tmp_path)


def test_bad_magic_and_labels(tmp_path):
    bad = tmp_path / "x"
    bad.write_bytes(b"\x00\x00\x09\x01" + bytes(8))
    with pytest.raises(FedsimError, match="not an IDX file"):
        read_idx(bad, ndim=1)
    fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(20, 12))
    with pytest.raises(FedsimError, match="labels outside"):
        load_dataset("mnist", tmp_path)


def test_missing_files_and_dirs(tmp_path):
    with pytest.raises(FedsimError, match="missing train-images"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(FedsimError, match="not a folder"):
        load_dataset("mnist", tmp_path / "nowhere")
    with pytest.raises(FedsimError, match="needs data-dir"):
        load_dataset("mnist")


def test_real_mnist(shared_data):
    ds = load_dataset("mnist", shared_data / "mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and len(ds.y_test) == 10000
    assert abs(float(ds.x_train.mean())) < 1e-2 and abs(float(ds.x_train.std()) - 1) < 1e-2


def test_registry_knows_every_task_without_loading():
    from fedsim.registry import DATASETS, TASKS

    assert all(len(part.tasks) == 1 and part.tasks[0] in TASKS for part in DATASETS.values())


def test_hf_source_needs_an_hf_dataset():
    with pytest.raises(FedsimError, match="use dataset hf-image or hf-text"):
        load_dataset("mnist", "hf:ylecun/mnist")
