"""experiments.research.bench_cohort and profile_cohort run (the GPU checks use them), and cohorts
train as the one-by-one path does."""

import re

from experiments.research import bench_cohort, bench_rounds, profile_cohort


def test_quick_suite_with_both_clippings(capsys):
    bench_cohort.main(["--device", "cpu", "--quick", "--clipping", "both", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| CPU")]
    assert len(rows) == len(bench_cohort.QUICK)
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        dp, cohort, diff = cells[6], cells[8], float(cells[10])
        assert len(cohort.split(" / ")) == (2 if dp == "yes" else 1), row
        assert all(re.fullmatch(r"\d+\.\d{3}", t) for t in cohort.split(" / ")), row
        assert diff < 1e-6, row  # (b) did (a)'s training, with either clipping


def test_profile_reports_every_workload(capsys):
    profile_cohort.main(["--device", "cpu", "--quick", "--rows", "3"])
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("K ")]
    assert len(heads) == len(bench_cohort.QUICK)
    for head in heads:
        wall, ops = re.search(r"wall (\d+\.\d+) s, .* (\d+) host ops", head).groups()
        assert float(wall) > 0 and int(ops) > 0, head


def test_the_round_table_times_every_way(monkeypatch):
    runs = []

    def one_run(config, folder):  # a whole run takes 20 s here: its row is made up
        runs.append(config)
        return {"later rounds s": 0.5, "round 1 s": 4.0, "GPU util %": None,
                "accuracy": 0.5, "epsilon": 8.0}  # fmt: skip

    monkeypatch.setattr(bench_rounds, "one_run", one_run)
    table = bench_rounds.round_table("cpu", "/data/mnist", quick=True, repeats=1)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [row[0] for row in rows] == [
        "training only, one client at a time",
        "training only, vectorized",
        "fedsim run, clients-per-worker 1",
        "fedsim run, clients-per-worker 6",
    ]
    assert all(float(row[1]) > 0 for row in rows[:2])
    assert float(rows[1][4].split()[-1]) < 1e-6  # the cohort did the one-by-one training
    quick = bench_rounds.QUICK  # digits, the default dataset
    assert runs == [{**quick, "client-gpus": 0.0, "clients-per-worker": k} for k in (1, 6)]
