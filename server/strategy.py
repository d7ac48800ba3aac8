"""Strategies: FedAvg with client sampling from the run's streams, and a ledger wrapper.

Flower's FedAvg samples nodes with an unseeded ``random.sample`` and averages replies in
arrival order, so two runs with one seed differ. ``SampledFedAvg`` samples clients from
the run's cohort stream of each round (``fedsim.dp.randomness``: the seed's, or the OS's
with ``secure-noise``) and averages in client order. ``PrivacyLedger`` wraps any
strategy, as Flower's DP wrappers do, and records what each sampled client's DP-SGD spent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedsim.dp import Purpose, numpy_generator, stream_seed
from fedsim.messages import (
    ARRAYS,
    CONFIG,
    METRICS,
    PARTITION_KEY,
    ROUND_KEY,
    WEIGHT_KEY,
    PrivacySpent,
    decode_train_report,
    named_partition,
)
from fedsim.server.privacy import Ledger, record


def sample_clients(
    num_clients: int, per_round: int, *, root: bytes, server_round: int, poisson: bool = False
) -> list[int]:
    """The sorted client ids that train in ``server_round``; a pure function of its inputs.

    Fixed-size sampling without replacement by default; with ``poisson`` each client is
    in independently with probability ``per_round / num_clients`` (what user-level DP
    accounting assumes), so the cohort size varies. ``root``: the run's randomness root.
    """
    seed = stream_seed(root, purpose=Purpose.COHORT, server_round=server_round)
    rng = numpy_generator(seed)
    if poisson:
        return np.flatnonzero(rng.random(num_clients) < per_round / num_clients).tolist()
    return sorted(rng.choice(num_clients, size=per_round, replace=False).tolist())


def client_of(msg: Message) -> int:
    """The client (partition id) a train message is for, or a train reply is from; -1: none."""
    if not msg.has_content():
        return -1
    if CONFIG in msg.content and (named := named_partition(msg.content)) is not None:
        return named
    return int(msg.content[METRICS][PARTITION_KEY])


def place(chosen: list[int], nodes: list[int], *, bound: bool) -> list[int]:
    """The Flower node that runs each chosen client.

    ``bound``: ``nodes[c]`` holds client c's data (SuperNodes, one per client). Otherwise
    the nodes are interchangeable simulation workers: the cohort is spread over them in
    turn, and each message names its client, so a population of any size needs only as
    many nodes as a round has clients.
    """
    if bound:
        return [nodes[c] for c in chosen]
    return [nodes[i % len(nodes)] for i in range(len(chosen))]


class SampledFedAvg(FedAvg):
    """FedAvg over ``num_clients`` clients placed on Flower nodes by :func:`place`."""

    def __init__(
        self,
        *,
        num_clients: int,
        nodes: list[int],
        bound: bool,
        clients_per_round: int,
        root: bytes,
        poisson: bool = False,
    ) -> None:
        super().__init__(
            fraction_evaluate=0.0,
            min_available_nodes=len(nodes),
            weighted_by_key=WEIGHT_KEY,
            arrayrecord_key=ARRAYS,
            configrecord_key=CONFIG,
        )
        self.num_clients = num_clients
        self.nodes = nodes
        self.bound = bound
        self.clients_per_round = clients_per_round
        self.root = root
        self.poisson = poisson

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to this round's sample of clients."""
        chosen = sample_clients(
            self.num_clients,
            self.clients_per_round,
            root=self.root,
            server_round=server_round,
            poisson=self.poisson,
        )
        messages = []
        for client, node in zip(chosen, place(chosen, self.nodes, bound=self.bound), strict=True):
            # one ConfigRecord per message (it names the client); the arrays are shared
            record = ConfigRecord({**config, ROUND_KEY: server_round, PARTITION_KEY: client})
            content = RecordDict({ARRAYS: arrays, CONFIG: record})
            messages.append(Message(content, node, MessageType.TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg in client order, so float sums do not depend on arrival order."""
        return super().aggregate_train(server_round, sorted(replies, key=client_of))


class StrategyWrapper(Strategy):
    """A strategy around ``inner`` that delegates every step; wrappers override some.

    This is how DP is added here, as in Flower's DP wrappers: around a strategy, not as
    a subclass of it.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate to the wrapped strategy."""
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the wrapped strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate to the wrapped strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)


class PrivacyLedger(StrategyWrapper):
    """Wrap a strategy; record what every sampled client spent in ``ledger``.

    A client that replied is charged what its DP optimizer reported. A client that was
    sent the model but whose reply is missing, failed or was rejected is charged its full
    prescribed spend (``expected``): its data may have been used, and the ledger must
    never undercount.
    """

    def __init__(
        self,
        inner: Strategy,
        ledger: Ledger,
        *,
        expected: Callable[[int], PrivacySpent],
    ) -> None:
        super().__init__(inner)
        self.ledger = ledger
        self.expected = expected
        self.sampled: dict[int, list[int]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, remembering which clients this round's data may come from."""
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.sampled[server_round] = [client_of(m) for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record every sampled client's spending, then delegate aggregation."""
        replies = list(replies)
        reported = {}
        for msg in replies:
            if msg.has_content():
                report = decode_train_report(msg.content)
                reported[report.partition_id] = report.spent
        for client in self.sampled.get(server_round, []):
            spent = reported[client] if client in reported else self.expected(client)
            record(self.ledger, client, server_round, spent)
        return self.inner.aggregate_train(server_round, replies)
