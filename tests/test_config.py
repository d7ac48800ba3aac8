import tomllib

import pytest
import torch
from flwr.serverapp.strategy import FedAvgM

from fedsim.config import (
    FedsimConfig,
    as_config,
    check_delta,
    config_mapping,
    config_values,
    load_config,
    parse_config,
    parse_override,
)
from fedsim.data import load_checked
from fedsim.errors import FedsimError
from fedsim.experiments import sweep
from fedsim.experiments.sweep import grid_axes, run_sweep
from tests.conftest import ROOT


def test_defaults_match_flower_app_config():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # flwr run runs the deployment apps, which refuse seeded noise
    deployment_defaults = FedsimConfig().to_flat() | {"secure-noise": True}
    assert pyproject["tool"]["flwr"]["app"]["config"] == deployment_defaults


def test_experiment_configs_are_valid():
    configs = sorted((ROOT / "experiments" / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        load_config(path)


def test_overrides_are_typed():
    cfg = load_config(None, ["num-rounds=3", "lr=0.1", "dp=none", "name=x"])
    assert (cfg.num_rounds, cfg.lr, cfg.dp, cfg.name) == (3, 0.1, "none", "x")
    assert parse_override("target-epsilon=2") == ("target-epsilon", 2)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"model": "resnet"}, "unknown model 'resnet'"),
        ({"target-epsilon": 0}, "target-epsilon"),
        ({"target-epsilon": -1.0}, "target-epsilon"),
        ({"dirichlet-alpha": 0}, "dirichlet-alpha"),
        ({"num-clients": 0}, "num-clients"),
        ({"clients-per-round": 20}, "exceeds num-clients"),
        ({"dp": "maybe"}, "dp"),
        ({"num-client": 3}, "did you mean 'num-clients'"),
        ({"lr": "fast"}, "lr"),
        ({"delta": 1.5}, "delta"),
        ({"grad-sample": "slow"}, "grad-sample"),
        (
            {"name": "my run"},
            "may hold only letters, digits, '.', '_' and '-'; for example name = \"my-run\"",
        ),
        ({"strategy": "FedAvg"}, "did you mean 'fedavg'?"),
    ],
)
def test_bad_values_give_one_line(values, needle):
    with pytest.raises(FedsimError) as info:
        parse_config(values)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_bad_override_syntax():
    with pytest.raises(FedsimError, match="KEY=VALUE"):
        load_config(None, ["num-rounds"])
    with pytest.raises(FedsimError, match="--grid expects KEY=VALUE, got 'lr'; for example --grid"):
        grid_axes(["lr"])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FedsimError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = = 3\n")
    with pytest.raises(FedsimError, match="not valid TOML"):
        load_config(bad)


def test_validation_is_not_assert_based():
    # python -O strips asserts; a frozen, validated model must still refuse bad values
    with pytest.raises(FedsimError):
        parse_config({"batch-size": -4})


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"model": "cnn", "dataset": "sst2"}, "model cnn cannot learn dataset sst2"),
        ({"partition": "natural"}, "partition natural needs a dataset with natural users"),
        ({"min-samples": 10}, "applies only to partition natural"),
        ({"dp": "user", "min-clients": 2}, "min-clients > 1 is refused under user-level DP"),
        ({"max-samples": -1}, "max-samples"),
        ({"num-rounds": -1}, "num-rounds: must be ≥ 1, got -1; for example num-rounds = 30"),
        ({"delta": 2}, "delta: must be < 1.0, got 2"),
        ({"dp": "User"}, "dp: 'User' is not one of none, sample, user, both; did you mean 'user'?"),
    ],
)
def test_pairing_and_partition_errors(values, needle):
    with pytest.raises(FedsimError) as info:
        parse_config(values)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_next_char_loss_only_for_next_char():
    with pytest.raises(FedsimError, match="applies only to next-char datasets"):
        parse_config({"next-char-loss": "all"})
    cfg = parse_config({"dataset": "shakespeare", "model": "lstm", "next-char-loss": "all"})
    assert cfg.next_char_loss == "all"


class NamedNet(torch.nn.Module):
    """A model given to the API as an object, found again by its import path."""

    def __init__(self, **_):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)


def test_parts_given_as_objects_become_import_paths():
    config = as_config(model=NamedNet, strategy=FedAvgM)
    assert config.model == f"{__name__}:NamedNet"
    assert config.strategy == "flwr.serverapp.strategy.fedavgm:FedAvgM"

    def local(data_dir):  # not importable by name from another process
        return None

    with pytest.raises(
        FedsimError, match=r"dataset: .*local is defined in .*\(inside a function\)"
    ):
        as_config(dataset=local)
    NamedNet.__module__ = "__main__"  # as if defined in the script being run
    try:
        with pytest.raises(FedsimError, match=r"defined in the script you run, .*'mine:NamedNet'"):
            as_config(model=NamedNet)
    finally:
        NamedNet.__module__ = __name__


def test_a_sigma_and_the_budget_it_would_ignore_are_refused_together(tmp_path):
    needle = "noise-multiplier = 1.0 fixes σ, so target-epsilon = 3 would not be used"
    with pytest.raises(FedsimError, match=needle):
        load_config(None, ["noise-multiplier=1.0 target-epsilon=3"])
    with pytest.raises(FedsimError, match="user-noise-multiplier = 2"):
        as_config({"user_noise_multiplier": 2, "user_target_epsilon": 1})
    assert as_config({"noise-multiplier": 0, "target-epsilon": 3}).target_epsilon == 3
    # a resolved config keeps its budget beside the σ solved from it; a new budget would
    # meet that σ
    solved = FedsimConfig(noise_multiplier=1.1, target_epsilon=3)
    assert as_config(solved).noise_multiplier == 1.1
    with pytest.raises(FedsimError, match="fixes σ, so target-epsilon = 2"):
        as_config(solved, target_epsilon=2)
    assert as_config(solved, noise_multiplier=0, target_epsilon=2).noise_multiplier == 0
    # a σ set over a shipped config's budget overrides it knowingly; a budget set over a
    # file's σ would be ignored
    shipped = ROOT / "experiments" / "configs" / "mnist-cnn.toml"
    assert load_config(shipped, ["noise-multiplier=1.0"]).noise_multiplier == 1.0
    # ... and leaves the merged values without that budget, so that passing them on (the
    # sweep command hands them to fedsim.sweep, which writes sweep.toml) is no conflict
    merged = config_values(shipped, ["noise-multiplier=1.0"])
    assert "target-epsilon" not in merged and config_mapping(merged)["noise-multiplier"] == 1.0
    # a resolved config as a mapping (summary.json's config) keeps its budget beside its σ
    resolved = solved.to_flat()
    assert as_config(resolved, seed=1).target_epsilon == 3
    (tmp_path / "fixed.toml").write_text("noise-multiplier = 1.5\n")
    with pytest.raises(FedsimError, match=r"noise-multiplier = 1\.5 fixes σ"):
        load_config(tmp_path / "fixed.toml", ["target-epsilon=2"])
    # a sweep's points: a grid budget beside the base's σ
    with pytest.raises(FedsimError, match="noise-multiplier = 2 fixes σ, so target-epsilon = 1"):
        run_sweep({"noise-multiplier": 2}, grid={"target-epsilon": [1]}, seeds=[0], jobs=1,
                  out=tmp_path / "s")  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_a_sweep_refuses_a_folder_that_holds_other_runs(tmp_path):
    """The frontier reads every run under --out: a run's folder, or one of other runs,
    would mix them in (and a run's own summary hides the sweep's points)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    for out in (tmp_path / "run", tmp_path):
        with pytest.raises(FedsimError, match=r"holds other files and no sweep"):
            run_sweep({}, grid={"lr": [0.1]}, seeds=[0], jobs=1, out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_not_named_is_named_by_its_dataset_and_model():
    assert parse_config({}).name == "digits-cnn" == FedsimConfig().name
    assert parse_config({"model": "lstm", "dataset": "sst2"}).name == "sst2-lstm"
    assert parse_config({"model": "lstm", "name": "mine"}).name == "mine"
    resolved = parse_config({"model": "lstm"}).to_flat()  # a resumed run keeps its name
    assert parse_config(resolved | {"dataset": "sms-spam"}).name == "digits-lstm"


def test_a_delta_that_bounds_nothing_is_refused():
    """(0, 1/n)-DP allows publishing one record whole: δ must be below 1/n per unit."""
    refused = r"delta 0\.001 is not below 1/n = 0\.001 for the run's 1000 training examples"
    with pytest.raises(FedsimError, match=refused):
        check_delta(parse_config({"delta": 1e-3}), 1000)
    check_delta(parse_config({"delta": 1e-4}), 1000)
    check_delta(parse_config({"delta": 0.5, "dp": "none"}), 1000)  # no DP: no δ
    user = {"dp": "user", "num-clients": 10, "clients-per-round": 5, "user-noise-multiplier": 1}
    with pytest.raises(FedsimError, match=r"for the run's 10 clients"):
        check_delta(parse_config({**user, "delta": 0.1}), 10**6)
    with pytest.raises(FedsimError, match=r"1437 training examples: .* set delta well below 1/n"):
        load_checked(parse_config({"delta": 1e-3}))  # digits: 1,437, before any engine


def test_a_sweep_begun_with_a_relative_data_dir_continues(tmp_path, monkeypatch):
    """sweep.toml written before data-dir was made absolute: the same sweep, continued."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.toml").write_text('data-dir = "mydata"\n')
    monkeypatch.setattr(sweep, "run_points", lambda *args, **kwargs: [])
    run_sweep({"data-dir": "mydata"}, grid={"lr": [0.1]}, seeds=[0], jobs=1, out=out)
    assert f'data-dir = "{tmp_path / "mydata"}"' in (out / "sweep.toml").read_text()
