"""A ClientApp for tests: fedsim's own, except client 1 raises and client 2 sends NaNs."""

import sys
from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from fedsim.clients import client_app as real
from fedsim.messages import ARRAYS, named_partition

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return real.query(msg, context, deployment=False)


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = named_partition(msg.content)  # simulation nodes are workers: the message names it
    if pid == 1:
        raise RuntimeError("disk full on client 1")
    reply = real.train(msg, context, deployment=False)
    if pid == 2:
        arrays = reply.content[ARRAYS]
        key = next(iter(arrays))
        arrays[key] = Array(np.full(arrays[key].numpy().shape, np.nan, dtype=np.float32))
    return reply


if __name__ == "__main__":
    from fedsim.config import load_config
    from fedsim.experiments.run import run_experiment

    config = load_config(None, sys.argv[2:])
    run_experiment(config, out=Path(sys.argv[1]), client_app=app)
