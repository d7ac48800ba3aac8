"""Reports and frontiers are rebuilt from result files alone."""

import json
import math
import subprocess
import sys

import dp_accounting
import pytest

from fedsim import results
from fedsim.config import FedsimConfig
from fedsim.dp.accounting import RDP_ORDERS
from fedsim.errors import FedsimError
from fedsim.experiments import cli
from fedsim.experiments.sweep import grid_axes, grid_points
from fedsim.results import RoundRow, frontier, plots
from fedsim.results.report import format_epsilon
from tests.conftest import ROOT


def fake_run(path, *, eps, acc, seed, dp="sample", **keys):
    """A results folder as `fedsim run` writes it (only the files report code reads)."""
    path.mkdir(parents=True)
    cfg = FedsimConfig(seed=seed, dp=dp, target_epsilon=eps or 1.0, **keys).to_flat()
    unit = "none" if dp == "none" else "sample"
    summary = {
        "accuracy": acc, "loss": 0.3, "epsilon": eps, "delta": 1e-5 if eps else None,
        "privacy_unit": unit, "accountant": "rdp" if eps else None,
        "epsilon_by_unit": {"sample": eps} if eps else {}, "noise_multiplier": 1.1,
        "max_grad_norm": 1.0, "user_noise_multiplier": None, "max_update_norm": None,
        "num_rounds": 30, "num_clients": 5, "config": cfg,
    }  # fmt: skip
    results.write_json(path / results.SUMMARY, summary)
    rows = [
        RoundRow(0, 0.1, 2.3, 0.0, 0.1, 0, 0, "", "", eps and 0.0, None, None),
        RoundRow(1, acc, 0.3, eps or math.inf, 1.0, 2, 0, "0 1", "", eps, None, None),
    ]
    results.write_csv(path / results.ROUNDS, [r.to_csv() for r in rows], results.ROUND_FIELDS)
    # each client's ledger; client 1 samples more and sets the run's worst case
    ledger = {c: [{"round": 1, "noise_multiplier": 1.1, "sample_rate": q, "steps": 300}]
              for c, q in (("0", 0.02), ("1", 0.05))}  # fmt: skip
    units = {"sample": {"clients": ledger}} if eps else {}
    results.write_json(path / results.PRIVACY, {"accountant": "rdp", "units": units})


@pytest.fixture
def sweep(tmp_path):
    for seed, (a1, a8) in enumerate([(0.70, 0.90), (0.74, 0.92)]):
        fake_run(tmp_path / f"e1_s{seed}", eps=1.0, acc=a1, seed=seed)
        fake_run(tmp_path / f"e8_s{seed}", eps=8.0, acc=a8, seed=seed)
        fake_run(tmp_path / f"nodp_s{seed}", eps=None, acc=0.97, seed=seed, dp="none")
    return tmp_path


def test_frontier_pools_seeds_and_sorts_by_epsilon(sweep):
    rows = frontier.frontier(results.find_runs([sweep]))
    assert [(r["unit"], r["epsilon"], r["seeds"]) for r in rows] == [
        ("sample", 1.0, 2), ("sample", 8.0, 2), ("none", math.inf, 2)]  # fmt: skip
    assert rows[0]["accuracy_mean"] == pytest.approx(0.72)
    assert rows[0]["accuracy_std"] == pytest.approx(0.0283, abs=1e-4)
    written = frontier.write_frontier(rows, sweep)
    assert all(p.stat().st_size > 0 for p in written)
    # the two seeds' runs share their data: their ledgers compose, the worst client's of
    # each (dp-accounting's RDP, at the same orders, computes it independently)
    worst = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1))
    rdp = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    rdp.compose(dp_accounting.SelfComposedDpEvent(worst, 600))
    assert rows[0]["epsilon_pooled"] == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-3)
    assert rows[0]["pooled_accountant"] == "rdp" and math.isinf(rows[2]["epsilon_pooled"])
    pooled = format_epsilon(rows[0]["epsilon_pooled"])
    table = (sweep / "frontier.md").read_text()
    assert f"| sample | 1 | 1e-05 | rdp | 0.7200 ± 0.0283 | 2 | {pooled} |" in table
    assert "a reader of all of them" in table


def test_a_frontier_row_says_what_sets_it_apart(tmp_path):
    """Two points that differ in a key no column shows (lr) must not read as one twice."""
    for lr, acc in ((0.1, 0.6), (0.5, 0.8)):
        fake_run(tmp_path / f"lr{lr}", eps=1.0, acc=acc, seed=0, lr=lr)
    rows = frontier.frontier(results.find_runs([tmp_path]))
    assert sorted(r["setting"] for r in rows) == ["lr=0.1", "lr=0.5"]
    table = frontier.markdown(rows)
    assert table.startswith("| setting | unit |") and "| lr=0.5 | sample | 1 |" in table


def test_report_command_rebuilds_from_files(sweep):
    result = subprocess.run(
        [sys.executable, "-m", "fedsim.experiments.cli", "report", str(sweep)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "0.7200 ± 0.0283" in result.stdout
    assert (sweep / "e1_s0" / results.PLOT).is_file()
    assert json.loads((sweep / "e1_s0" / results.SUMMARY).read_text())["accuracy"] == 0.70


def test_report_reads_a_folder_it_cannot_write(sweep, monkeypatch, capsys):
    """A colleague's or an archived results folder: report it, redraw nothing there."""

    def read_only(result):
        raise PermissionError(13, "Permission denied", str(result.path))

    monkeypatch.setattr(plots, "plot_run", read_only)
    assert cli.main(["report", str(sweep)]) == 0
    said = capsys.readouterr().out
    assert "its plot was not redrawn (Permission denied)" in said and "0.7200 ± 0.0283" in said
    (sweep / "taken").write_text("a file")
    assert cli.main(["report", str(sweep), "--out", str(sweep / "taken")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_grid_points_product_with_no_dp_baseline():
    points = grid_points(grid_axes(["target-epsilon=1,none", "lr=0.1,0.5"]), [0, 1])
    assert len(points) == 8
    assert points["nodp_lr=0.5_seed=1"] == {"dp": "none", "lr": 0.5, "seed": 1}
    assert points["target-epsilon=1_lr=0.1_seed=0"] == {"target-epsilon": 1, "lr": 0.1, "seed": 0}
    # the API's form: Python names and values, None for no DP
    assert grid_points({"target_epsilon": [None]}, [3]) == {
        "nodp_seed=3": {"dp": "none", "seed": 3}
    }
    with pytest.raises(FedsimError, match="no values"):
        grid_axes(["lr="])


def test_a_printed_epsilon_is_never_below_the_computed_one():
    """Rounding to nearest printed 8.004 as "8": ε rounds up, an audit's lower bound down."""
    report = results.report
    assert (report.format_epsilon(8.004), report.format_epsilon(8.004, places=3)) == (
        "8.01",
        "8.004",
    )
    assert (report.format_epsilon(2.77), report.format_epsilon(4.0)) == ("2.77", "4")
    assert (report.format_epsilon(3.99849, places=3), report.format_lower_bound(3.99849)) == (
        "3.999",
        "3.99",
    )
    assert report.format_epsilon(math.inf) == report.format_epsilon(None) == "∞"
    assert report.format_epsilon(5.5e26, places=3) == "5.5e+26"  # σ near 0: no 27 digits
    values = [0.0, 1e-9, 7.9999, 9.9951, 12345.6, *(10 ** (k / 97 - 4) for k in range(800))]
    for eps in values:
        for places in (None, 1, 3):
            assert float(report.format_epsilon(eps, places=places)) >= eps
            assert float(report.format_lower_bound(eps, places=places)) <= eps
    summary = {"privacy_unit": "sample", "accuracy": 0.5, "epsilon_by_unit": {"sample": 7.9991},
               "noise_multiplier": 1.0, "delta": 1e-5, "accountant": "rdp",
               "noise": {"kind": "secure"}, "config": {"seed": 0}}  # fmt: skip
    assert "ε = 8.000 for one sample" in report.summary_line(summary)


def test_a_grid_over_what_seeds_or_folders_set_is_refused():
    for key, needle in [("seed", "--seeds"), ("name", "own folder"), ("out_dir", "own folder")]:
        with pytest.raises(FedsimError, match=f"^--grid {key.replace('_', '-')}: .*{needle}"):
            grid_points({key: [1, 2]}, [0])


def test_an_audit_that_could_show_nothing_says_so_and_one_that_found_nothing_does_not():
    audit = {"epsilon": 0.0, "unit": "sample", "confidence": 0.95, "correct": 0, "guesses": 0,
             "canaries": 14, "ceiling": 0.0}  # fmt: skip
    words = results.report.audit_words({"audit": {"sample": audit}})
    assert "with 14 canaries no number of guesses shows ε > 0: use more" in words
    # a private run's audit finds nothing although perfect guesses could have shown 3.9
    private = audit | {"canaries": 1000, "ceiling": 3.9}
    assert "use more" not in results.report.audit_words({"audit": {"sample": private}})
