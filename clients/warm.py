"""What a simulation worker imports as it starts, before its first message.

A local Ray imports this module in every worker it starts (``preload_python_modules``,
set by ``fedsim.experiments.raystart``), so that round 1 does not wait for it: the
client app (torch, Opacus, Flower: 5-10 s a worker); Flower's actor class, which hosts
it (its module pulls in Flower's server side: 1.2 s more); and ``torch._dynamo``, which
every ``torch.optim`` optimizer's constructor imports on its first call (1 s of a
worker's first training). Then the run's dataset, which ``RayStart`` names in
``PRELOAD_VAR`` (MNIST: 0.6 s a worker).

Nothing here may fail: Ray takes any error but an ImportError as the worker's crash, and
the run would lose the worker with no reason given. A module that does not import is
left for the first message to import again, where the error reaches the run as that
client's failure, with its reason.
"""

import contextlib
import importlib
import json
import os

PRELOAD = (
    "fedsim.clients.client_app",
    "flwr.simulation.ray_transport.ray_actor",
    "torch._dynamo",
)

for _name in PRELOAD:
    with contextlib.suppress(Exception):
        importlib.import_module(_name)

with contextlib.suppress(Exception):
    from fedsim.clients.task import preload
    from fedsim.data import PRELOAD_VAR

    if PRELOAD_VAR in os.environ:
        preload(*json.loads(os.environ[PRELOAD_VAR]))
