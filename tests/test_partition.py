import numpy as np
import pytest

from fedsim.data import load_digits
from fedsim.errors import FedsimError
from fedsim.partition import label_counts, partition

LABELS = load_digits().y_train


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("num_clients", [1, 7, 50])
def test_disjoint_complete_seeded(method, num_clients):
    parts = partition(LABELS, num_clients, method=method, seed=3, alpha=0.3)
    assert len(parts) == num_clients
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)  # complete, and with unique below: disjoint
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))
    assert all(len(p) > 0 for p in parts)
    again = partition(LABELS, num_clients, method=method, seed=3, alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_seed_changes_partition():
    a = partition(LABELS, 10, method="iid", seed=0)
    b = partition(LABELS, 10, method="iid", seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_sizes_balanced():
    sizes = [len(p) for p in partition(LABELS, 10, method="iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_alpha_controls_skew():
    def skew(alpha):
        parts = partition(LABELS, 10, method="dirichlet", seed=0, alpha=alpha)
        return np.mean([max(label_counts(LABELS[p], 10)) / len(p) for p in parts])

    assert skew(0.1) > skew(100.0) + 0.3


def test_shards_give_few_classes():
    parts = partition(LABELS, 20, method="shards", seed=0, shards_per_client=2)
    classes = [np.count_nonzero(label_counts(LABELS[p], 10)) for p in parts]
    assert max(classes) <= 4


def test_more_clients_than_samples():
    with pytest.raises(FedsimError, match="exceeds the"):
        partition(LABELS[:5], 6, method="iid", seed=0)
