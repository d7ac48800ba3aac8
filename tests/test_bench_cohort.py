"""experiments.research.bench_cohort runs (the GPU check depends on it), and its cohorts
train as the one-by-one path does."""

import re

from experiments.research import bench_cohort


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
