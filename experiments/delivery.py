"""Messages to simulation workers as soon as the server sends them, not up to 0.1 s later.

Flower 1.42's simulation engine hands messages to its workers from a thread that asks
the link state for each node's next message ten times a second
(``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``). Every round then
waits 50 ms on average, up to 100 ms, before any client starts: a fifth of a GPU round
of 10 clients (``mnist-cnn``: 0.52 s on an H100, docs/benchmarks.md). Polling faster
would cost CPU, since each poll scans every stored message once per node.

:func:`prompt_delivery` replaces that thread's function, for one simulation, by one that
polls as Flower's does, at most one message per node each time, and also the moment the
server stores a message (``store_message_ins`` of the same in-memory link state, wrapped
to set an event). Nothing else changes: which messages go where, in what order, and the
0.1 s poll as a fallback.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api

POLL_S = 0.1  # Flower's own interval, kept as the fallback
_SIGNATURE = ["state", "queue", "nodes_mapping", "f_stop"]


@contextmanager
def prompt_delivery() -> Iterator[None]:
    """Within this block, simulations deliver a message the moment it is stored.

    A Flower other than the one this was written for (whose function has another
    signature) runs unchanged.
    """
    original = vce_api.add_messages_to_queue
    if list(inspect.signature(original).parameters) != _SIGNATURE:
        yield
        return
    vce_api.add_messages_to_queue = deliver_promptly
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


def deliver_promptly(
    state: Any, queue: Queue[Message], nodes_mapping: dict[int, int], f_stop: threading.Event
) -> None:
    """Flower's ``add_messages_to_queue``, woken also by every stored message."""
    stored = threading.Event()
    state.store_message_ins = _and_set(state.store_message_ins, stored)
    while not f_stop.is_set():
        stored.clear()  # before the scan: a message stored during it wakes the next one
        for node_id in nodes_mapping:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        stored.wait(POLL_S)


def _and_set(store: Callable[..., Any], event: threading.Event) -> Callable[..., Any]:
    def store_and_set(*args: Any, **kwargs: Any) -> Any:
        result = store(*args, **kwargs)
        event.set()
        return result

    return store_and_set
