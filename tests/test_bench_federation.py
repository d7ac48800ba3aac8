"""The federation benchmark compares like with like: same work, same result."""

import pytest

from experiments.research import bench_federation as bench


def test_split_total_takes_round_one_warm_up_as_start_up():
    # round 0 (data, first evaluation) 3 s; round 1 pays 4 s of warm-up on top of 2 s
    startup, per_round = bench.split_total(20.0, [3.0, 6.0, 2.0, 2.0])
    assert per_round == 2.0
    assert startup == pytest.approx(20.0 - 3 * 2.0)


@pytest.mark.slow
def test_plain_loop_and_simulation_do_the_same_work():
    config = bench.workload("", rounds=2, dp="sample", model="cnn")
    # client-cpus=2: the simulation's clients in one Ray worker, 13 s less CPU on 2 cores
    config = config.model_copy(update={"dataset": "digits", "client_cpus": 2.0})
    plain = bench.run_side("plain loop", config)
    simulated = bench.run_side("fedsim run", config)
    for total, seconds, _ in (plain, simulated):
        assert len(seconds) == 3 and 0 < sum(seconds) < total
    # same partitions, seeds, σ and library functions: the same model within float noise
    assert plain[2] == pytest.approx(simulated[2], abs=0.01)
