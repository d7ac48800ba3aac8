import numpy as np
import pytest

from fedsim.config import parse_config
from fedsim.data import load_digits
from fedsim.data.partition import label_counts, partition, partition_dataset
from fedsim.errors import FedsimError

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


def users(num_users=12, seed=0):
    """Client ids of a LEAF-like dataset: users of very different sizes, interleaved."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(num_users), np.arange(1, num_users + 1) * 5))


def natural(ids, num_clients, **kw):
    return partition(
        np.zeros(len(ids), dtype=np.int64),
        num_clients,
        method="natural",
        seed=kw.pop("seed", 0),
        client_ids=ids,
        **kw,
    )


def test_natural_one_client_per_user_disjoint_complete_seeded():
    ids = users()
    parts = natural(ids, 12)
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(ids)))  # complete and disjoint
    assert [len(np.unique(ids[p])) for p in parts] == [1] * 12  # one user each
    assert [int(ids[p[0]]) for p in parts] == list(range(12))  # in user order
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    again = natural(ids, 12)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_natural_samples_users_by_seed():
    ids = users()
    picks = [tuple(int(ids[p[0]]) for p in natural(ids, 4, seed=s)) for s in range(6)]
    assert len(set(picks)) > 1 and picks[0] == tuple(int(ids[p[0]]) for p in natural(ids, 4))
    for part in natural(ids, 4, seed=3):
        assert np.array_equal(part, np.flatnonzero(ids == ids[part[0]]))  # whole users


def test_natural_min_and_max_samples():
    ids = users()  # user u has 5·(u+1) samples
    parts = natural(ids, 3, min_samples=50, max_samples=52)
    assert all(len(np.unique(ids[p])) == 1 and int(ids[p[0]]) >= 9 for p in parts)
    assert [len(p) for p in parts] == [50, 52, 52]
    assert len(np.unique(np.concatenate(parts))) == 154  # still disjoint
    with pytest.raises(
        FedsimError, match=r"exceeds the 3 users with at least 50 samples \(of 12\)"
    ):
        natural(ids, 4, min_samples=50)
    with pytest.raises(FedsimError, match="natural needs a dataset"):
        partition(LABELS, 3, method="natural", seed=0)


def test_max_samples_caps_every_partitioner_without_moving_it():
    for method in ("iid", "dirichlet", "shards"):
        full = partition(LABELS, 5, method=method, seed=1)
        capped = partition(LABELS, 5, method=method, seed=1, max_samples=100)
        for whole, part in zip(full, capped, strict=True):
            assert len(part) == min(100, len(whole)) and np.isin(part, whole).all()


OWN_SPLITS = """
import numpy as np


def halves(dataset, num_clients, rng):
    order = rng.permutation(len(dataset.y_train))
    return np.array_split(order, num_clients)


def overlap(dataset, num_clients, rng):
    return [np.arange(10)] * num_clients


def too_few(dataset, num_clients, rng):
    return [np.arange(10)]


def outside(dataset, num_clients, rng):
    return [np.arange(5) + 10_000 * k for k in range(num_clients)]


def empty(dataset, num_clients, rng):
    return [np.arange(10), np.arange(0)]


def floats(dataset, num_clients, rng):
    return [np.arange(5) + 0.5, np.arange(5, 10) + 0.5]


def raises(dataset, num_clients, rng):
    raise KeyError("site")
"""


@pytest.mark.parametrize(
    ("attr", "needle"),
    [
        ("overlap", "gave a sample to two clients; parts must be disjoint"),
        ("too_few", "must return a list of 2 index arrays"),
        ("outside", r"returned indices outside 0\.\.1436"),
        ("empty", "left a client without samples"),
        ("floats", "must return 1-d integer arrays"),
        ("raises", r"failed \(KeyError: 'site'\); fix the partition function"),
    ],
)
def test_a_partition_of_ones_own_is_checked(attr, needle, tmp_path, monkeypatch):
    (tmp_path / "own_split.py").write_text(OWN_SPLITS)
    monkeypatch.syspath_prepend(str(tmp_path))
    dataset = load_digits()
    config = parse_config({"num-clients": 2, "clients-per-round": 2})
    with pytest.raises(FedsimError, match=needle) as info:
        partition_dataset(dataset, config.model_copy(update={"partition": f"own_split:{attr}"}))
    assert "\n" not in str(info.value) and f"'own_split:{attr}'" in str(info.value)
    parts = partition_dataset(dataset, config.model_copy(update={"partition": "own_split:halves"}))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(dataset.y_train)))
