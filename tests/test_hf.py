"""Hugging Face datasets (the optional ``hf`` extra), offline: datasets saved locally."""

import numpy as np
import pytest

from fedsim.data import load_dataset
from fedsim.data.text import token_id
from fedsim.errors import FedsimError

EXTRA = "the optional extra: .venv/bin/python -m pip install -e '.[hf]'"
datasets = pytest.importorskip("datasets", reason=EXTRA)


def image_split(n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 6, 5), dtype=np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
    )
    rows = {"image": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(n)]}
    return datasets.Dataset.from_dict(rows, features=features), pixels


def text_split(n):
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    rows = {
        "text": [("good fine" if i % 2 else "bad awful") + f" w{i % 4}" for i in range(n)],
        "label": [i % 2 for i in range(n)],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def test_image_dataset_saved_to_disk(tmp_path):
    train, pixels = image_split(30, 0)
    test, _ = image_split(9, 1)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "imgs")
    ds = load_dataset("hf-image", tmp_path / "imgs")
    assert ds.x_train.shape == (30, 1, 6, 5) and ds.input_shape == (1, 6, 5)
    assert ds.num_classes == 3 and ds.y_test.tolist() == [i % 3 for i in range(9)]
    # standardised with the held-out images' statistics: one training image sets none
    scaled, held_out = pixels / 255.0, image_split(9, 1)[1] / 255.0
    expected = (scaled - held_out.mean()) / (held_out.std() + 1e-6)
    assert np.allclose(ds.x_train[:, 0], expected, atol=1e-4)


def test_text_dataset_without_test_split(tmp_path):
    text_split(40).save_to_disk(tmp_path / "txt")
    ds = load_dataset("hf-text", tmp_path / "txt")
    assert (len(ds.y_train), len(ds.y_test)) == (32, 8)  # a fixed stratified 20% held out
    assert ds.task == "text-classification" and ds.vocab[:2] == ("<pad>", "<unk>")
    words = {token_id(w) for w in ("good", "bad", "w1")}
    assert len(ds.vocab) == 8192 and words <= set(ds.x_train.ravel().tolist())


def test_not_a_saved_dataset(tmp_path):
    with pytest.raises(FedsimError, match="not a dataset saved with save_to_disk"):
        load_dataset("hf-text", tmp_path)
    with pytest.raises(FedsimError, match="needs data-dir"):
        load_dataset("hf-image")


def test_through_flwr_datasets_offline(tmp_path):
    """``hf:<path>`` goes through flwr-datasets' FederatedDataset; a local folder of
    parquet files stands in for the hub."""
    pytest.importorskip("flwr_datasets", reason=EXTRA)
    folder = tmp_path / "parquet"
    folder.mkdir()
    text_split(20).to_parquet(str(folder / "train.parquet"))
    text_split(6).to_parquet(str(folder / "test.parquet"))
    ds = load_dataset("hf-text", f"hf:{folder}")
    assert (len(ds.y_train), len(ds.y_test)) == (20, 6)
    assert np.array_equal(ds.y_train, np.arange(20) % 2)  # not shuffled: fedsim partitions


def test_no_training_label_sets_the_class_count(tmp_path):
    """Without a ClassLabel the held-out labels give it: a training label above them is
    refused in one line, not made a class of the published model by one example."""
    rows = {"text": ["good", "bad", "fine", "awful", "ok", "meh"], "label": [0, 1, 0, 1, 0, 7]}
    test = {"text": ["good", "bad", "so so"], "label": [0, 1, 2]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(test)}
    ).save_to_disk(tmp_path / "plain")
    with pytest.raises(FedsimError, match=r"labels outside 0\.\.2 \(found 0\.\.7\)"):
        load_dataset("hf-text", tmp_path / "plain")
    rows["label"][-1] = 2
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(test)}
    ).save_to_disk(tmp_path / "fine")
    assert load_dataset("hf-text", tmp_path / "fine").num_classes == 3
