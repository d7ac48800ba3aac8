"""Runnable experiments: the ``fedsim`` command, configs, sweeps and benchmarks."""
