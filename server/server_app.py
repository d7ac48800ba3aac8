"""Flower ServerApp. ``flwr run`` reads the run config; ``fedsim run`` passes a config."""

from __future__ import annotations

import threading
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsim import results
from fedsim.config import FedsimConfig, check_deployment, parse_config
from fedsim.data import Dataset
from fedsim.results import RoundRow, load_run, plots, report
from fedsim.server.federation import RoundCallback, run_federation
from fedsim.server.rounds import ReplyFn


def log_round(row: RoundRow) -> None:
    """Default progress: one log line per round."""
    log(
        INFO,
        "fedsim round %s: accuracy %.4f, loss %.4f, epsilon %s",
        row.round,
        row.accuracy,
        row.loss,
        report.format_epsilon(row.epsilon),
    )


def build_server_app(
    config: FedsimConfig | None = None,
    *,
    dataset: Dataset | None = None,
    run_dir: Path | None = None,
    on_round: RoundCallback = log_round,
    started: float | None = None,
    stop: threading.Event | None = None,
    node_per_client: bool = True,
    on_reply: ReplyFn | None = None,
) -> ServerApp:
    """A ServerApp for ``config``, or for the run config when ``config`` is None.

    ``flwr.simulation.run_simulation`` gives the ServerApp an empty run config, so
    ``fedsim run`` builds the app around its validated config instead. Without one the
    app reads ``flwr run``'s run config, checked for the deployment engine. A ``run_dir``
    holding a checkpoint resumes that run; setting ``stop`` ends the run after the
    current round. ``dataset``: the config's data, where the caller has loaded it
    already (it is loaded in the app otherwise). ``node_per_client`` False: the nodes
    are simulation workers (``FedsimConfig.simulation_workers``), not one
    SuperNode per client.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or check_deployment(parse_config(dict(context.run_config)))
        out = run_dir or results.default_run_dir(cfg.out_dir, cfg.name)
        run_federation(
            grid,
            cfg,
            dataset=dataset if config is not None else None,
            run_dir=out,
            on_round=on_round,
            started=started,
            stop=stop,
            node_per_client=node_per_client,
            on_reply=on_reply,
        )
        plots.plot_run(load_run(out))
        log(INFO, "fedsim results in %s", out)

    return app


app = build_server_app()
