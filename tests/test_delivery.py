"""Simulation workers get a message the moment the server stores it (experiments.delivery)."""

import threading
from queue import Queue

from flwr.server.superlink.fleet.vce import vce_api

from fedsim.experiments import delivery


class FakeState:
    """The two link-state calls the delivery thread makes, over one list of messages."""

    def __init__(self) -> None:
        self.stored: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def store_message_ins(self, msg: tuple[int, str]) -> str:
        with self.lock:
            self.stored.append(msg)
        return msg[1]

    def get_message_ins(self, *, node_id: int, limit: int | None) -> list[tuple[int, str]]:
        with self.lock:
            mine = [m for m in self.stored if m[0] == node_id][:limit]
            self.stored = [m for m in self.stored if m not in mine]
        return mine


def test_flower_s_delivery_thread_is_replaced_and_restored():
    original = vce_api.add_messages_to_queue
    with delivery.prompt_delivery():
        # this Flower's function has the signature it was written for: else nothing changes
        assert vce_api.add_messages_to_queue is delivery.deliver_promptly
    assert vce_api.add_messages_to_queue is original


def test_a_stored_message_is_delivered_without_waiting_for_the_poll(monkeypatch):
    monkeypatch.setattr(delivery, "POLL_S", 30.0)  # only the event can deliver within the test
    state, queue, stop = FakeState(), Queue(), threading.Event()
    thread = threading.Thread(
        target=delivery.deliver_promptly, args=(state, queue, {1: 0, 2: 1}, stop), daemon=True
    )
    thread.start()
    try:
        for msg in [(2, "a"), (1, "b")]:
            state.store_message_ins(msg)  # what the server's grid calls
            assert queue.get(timeout=5) == msg
        # Flower's pace: at most one message per node per scan
        state.store_message_ins((1, "c"))
        state.store_message_ins((1, "d"))
        assert queue.get(timeout=5) == (1, "c")
    finally:
        stop.set()
        state.store_message_ins((0, "wake"))  # ends the wait at once
        thread.join(timeout=5)
    assert not thread.is_alive()
