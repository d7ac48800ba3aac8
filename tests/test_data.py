import gzip
import subprocess
import sys

import numpy as np
import pytest
import sklearn.datasets
from sklearn.model_selection import train_test_split

from fedsim.data import load_dataset
from fedsim.data.images import read_idx
from fedsim.data.split import stratified_split
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


def test_digits_is_embedded_and_split_as_scikit_learn_split_it():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert set(np.unique(ds.y_train)) == set(range(10))
    bunch = sklearn.datasets.load_digits()  # what the loader read before, and how
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    parts = train_test_split(x, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0)
    for ours, theirs in zip((ds.x_train, ds.x_test, ds.y_train, ds.y_test), parts, strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("counts", [[2, 2], [5, 3, 9, 2], [7] * 6, [40, 3, 3, 3, 11], [2, 90]])
@pytest.mark.parametrize("test_size", [0.2, 0.5, 0.35])
def test_stratified_split_draws_what_scikit_learn_draws(counts, test_size):
    """Remainder ties, uneven classes, text labels: the same indices, in the same order."""
    rng = np.random.default_rng(sum(counts))
    y = rng.permutation(np.repeat(np.array([f"c{i}" for i in range(len(counts))]), counts))
    x = np.arange(len(y) * 3).reshape(len(y), 3)
    try:
        theirs = train_test_split(x, y, test_size=test_size, stratify=y, random_state=0)
    except ValueError:  # too few samples for the classes: refused in one line instead
        with pytest.raises(FedsimError, match="cannot hold"):
            stratified_split(x, y, test_size)
        return
    for ours, expected in zip(stratified_split(x, y, test_size), theirs, strict=True):
        np.testing.assert_array_equal(ours, expected)


def test_a_label_with_one_example_cannot_be_split():
    y = np.array([0, 0, 1, 1, 2, 0, 1])
    with pytest.raises(FedsimError, match=r"label\(s\) \[2\] have a single example"):
        stratified_split(np.zeros((7, 2)), y)


def test_loading_digits_does_not_import_scikit_learn():
    code = "import sys; from fedsim.data import load_dataset; load_dataset('digits'); "
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


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


OWN_DATA = """
import numpy as np
from fedsim import Dataset


def arrays(n=40, dtype=np.float32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 1, 2, 2)).astype(dtype), rng.integers(0, 3, n)


def build(x, y, **kw):
    fields = {"num_classes": 3, "input_shape": (1, 2, 2), **kw}
    return Dataset("own", x[:30], y[:30], x[30:], y[30:], **fields)


def good(data_dir):
    return build(*arrays(dtype=np.float64))  # numpy's default float: cast to float32


def labels_out_of_range(data_dir):
    x, y = arrays()
    return build(x, y + 1)


def one_label_short(data_dir):
    x, y = arrays()
    return Dataset("own", x[:30], y[:29], x[30:], y[30:], 3, (1, 2, 2))


def nan_input(data_dir):
    x, y = arrays()
    x[3, 0, 1, 1] = np.nan
    return build(x, y)


def other_shape(data_dir):
    return build(*arrays(), input_shape=(1, 4))


def float_labels(data_dir):
    x, y = arrays()
    return build(x, y.astype(np.float32))


def pixels(data_dir):
    x, y = arrays()
    return build((x * 100).astype(np.uint8), y)


def lists(data_dir):
    x, y = arrays()
    return Dataset("own", x[:30].tolist(), y[:30], x[30:], y[30:], 3, (1, 2, 2))


def text_ids_outside_vocab(data_dir):
    ids = np.arange(40).reshape(10, 4) % 7
    return Dataset("own", ids[:8], ids[:8, 0] % 2, ids[8:], ids[8:, 0] % 2, 2, (4,),
                   task="text-classification", vocab=("<pad>", "<unk>", "a", "b"))


def client_ids(data_dir):
    return build(*arrays(), client_ids=np.zeros(29, np.int64), users=("u",))


def raises(data_dir):
    raise FileNotFoundError("blobs.npz")
"""


@pytest.mark.parametrize(
    ("attr", "needle"),
    [
        ("labels_out_of_range", r"y_train has labels 1\.\.3, outside 0\.\.2; number the classes"),
        ("one_label_short", "30 inputs and 29 labels in its train split"),
        ("nan_input", "x_train holds NaN or infinite values"),
        ("other_shape", r"samples of shape \(1, 2, 2\), but its input_shape is \(1, 4\)"),
        ("float_labels", "y_train is float32; labels are integer class ids"),
        ("pixels", "x_train is uint8; images are floats"),
        ("lists", "x_train and y_train are list and ndarray; give numpy arrays"),
        ("text_ids_outside_vocab", r"integer token ids below the vocabulary's size \(4"),
        ("client_ids", "29 client_ids for 30 training samples"),
        ("raises", r"could not be loaded \(FileNotFoundError: blobs\.npz\)"),
    ],
)
def test_a_dataset_of_ones_own_is_checked_as_it_loads(attr, needle, tmp_path, monkeypatch):
    (tmp_path / "own_data.py").write_text(OWN_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FedsimError, match=needle) as info:
        load_dataset(f"own_data:{attr}")
    assert "\n" not in str(info.value) and f"own_data:{attr}" in str(info.value)
    good = load_dataset("own_data:good")
    assert good.x_train.dtype == np.float32 and good.x_test.dtype == np.float32
