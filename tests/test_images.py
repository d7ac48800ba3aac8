"""CIFAR-10 from its pickles and from image folders, real files and corrupt ones."""

import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from fedsim.data import load_dataset
from fedsim.data.images import CIFAR_TEST, CIFAR_TRAIN
from fedsim.errors import FedsimError
from tests.conftest import SHARED_DATA

PER_CLASS = 3


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """A few real JPEGs per class and split, extracted from the shared archive."""
    archive = SHARED_DATA / "cifar10-jpg" / "CIFAR-10-images.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set FEDSIM_SHARED_DATA)")
    root = tmp_path_factory.mktemp("cifar")
    wanted = {f"{i:04d}.jpg" for i in range(PER_CLASS)}
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar if m.isfile() and m.name.rsplit("/", 1)[-1] in wanted]
        tar.extractall(root, members=members, filter="data")
    return root


def write_batches(folder, n=6, labels=None, rows=3072):
    rng = np.random.default_rng(0)
    for name in (*CIFAR_TRAIN, *CIFAR_TEST):
        batch = {
            b"data": rng.integers(0, 256, (n, rows), dtype=np.uint8),
            b"labels": list(labels) if labels is not None else rng.integers(0, 10, n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar_pickles(tmp_path):
    write_batches(tmp_path)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.input_shape == (3, 32, 32)
    # the official layout: 1024 red, then green, then blue values per row
    raw = pickle.loads((tmp_path / "test_batch").read_bytes())[b"data"][0]
    green = (raw[1024:2048].reshape(32, 32) / 255.0 - 0.4822) / 0.2435
    assert np.allclose(ds.x_test[0, 1], green, atol=1e-5)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ({"rows": 3000}, "expected N rows of 3072"),
        ({"labels": [0, 1, 2, 3, 4, 10]}, "labels outside 0..9"),
    ],
)
def test_corrupt_pickles_name_the_file(tmp_path, damage, needle):
    write_batches(tmp_path, **damage)
    with pytest.raises(FedsimError, match=needle) as info:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_1" in str(info.value)


def test_pickle_that_runs_code_is_refused(tmp_path):
    write_batches(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps(print))
    with pytest.raises(FedsimError, match=r"data_batch_3: not a CIFAR-10 batch pickle"):
        load_dataset("cifar10", tmp_path)


def test_missing_batch(tmp_path):
    write_batches(tmp_path)
    (tmp_path / "data_batch_5").unlink()
    with pytest.raises(FedsimError, match="data_batch_5: missing"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FedsimError, match="no CIFAR-10 here"):
        load_dataset("cifar10", tmp_path / "..")
    with pytest.raises(FedsimError, match="needs data-dir"):
        load_dataset("cifar10")


def test_real_jpeg_folders(cifar_folder):
    ds = load_dataset("cifar10", cifar_folder)  # finds CIFAR-10-images/ one level down
    assert ds.x_train.shape == (10 * PER_CLASS, 3, 32, 32)
    assert np.bincount(ds.y_test).tolist() == [PER_CLASS] * 10
    first = cifar_folder / "CIFAR-10-images" / "train" / "airplane" / "0000.jpg"
    pixels = np.asarray(Image.open(first).convert("RGB"), dtype=np.float32) / 255.0
    assert np.allclose(ds.x_train[0, 0], (pixels[..., 0] - 0.4914) / 0.2470, atol=1e-5)
    assert abs(float(ds.x_train.mean())) < 0.5


def test_bad_images_name_the_file(cifar_folder, tmp_path):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(cifar_folder / "CIFAR-10-images", root)
    odd = root / "test" / "cat" / "0001.jpg"
    Image.new("RGB", (28, 28)).save(odd)
    with pytest.raises(FedsimError, match=r"cat/0001.jpg: image is 28×28"):
        load_dataset("cifar10", root)
    odd.write_bytes(b"not a jpeg")
    with pytest.raises(FedsimError, match=r"cat/0001.jpg: not a readable image"):
        load_dataset("cifar10", root)
    shutil.rmtree(root / "train" / "dog")
    with pytest.raises(FedsimError, match="expected 10 class folders, found 9"):
        load_dataset("cifar10", root)
