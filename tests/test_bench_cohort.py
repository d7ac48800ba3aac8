"""experiments.research.bench_cohort and profile_cohort run (the GPU checks use them), and cohorts
train as the one-by-one path does."""

import re

from experiments.research import bench_cohort, profile_cohort


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
