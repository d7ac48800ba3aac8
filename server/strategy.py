"""Wrappers around a strategy: fedsim's cohorts, and the privacy ledger.

``Cohorts`` samples each round's clients from the run's cohort stream
(``fedsim.dp.randomness``: the seed's, or the OS's with ``secure-noise``) and hands the
wrapped strategy (``server.algorithms``) replies in client order. ``PrivacyLedger``
records what each sampled client's DP-SGD spent. Wrappers around a strategy, as Flower's
DP wrappers are, rather than subclasses of one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.dp import Purpose, numpy_generator, stream_seed
from fedsim.errors import FedsimError, blamed
from fedsim.messages import (
    CONFIG,
    ROUND_KEY,
    PrivacySpent,
    decode_train_report,
    message_client,
    train_content,
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
    return message_client(msg.content) if msg.has_content() else -1


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


FIX = "fix the strategy"


class OwnStrategy(StrategyWrapper):
    """Around a strategy of one's own (``"module:attr"``): an error in it names it.

    Without this, a bug in the strategy's code would read as fedsim's ("internal error").
    """

    def __init__(self, inner: Strategy, name: str) -> None:
        super().__init__(inner)
        self.name = name

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate; its messages are listed here, so that its errors surface here."""
        with blamed(
            f"strategy '{self.name}' failed in configure_train of round {server_round}", FIX
        ):
            return list(self.inner.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate."""
        with blamed(
            f"strategy '{self.name}' failed in aggregate_train of round {server_round}", FIX
        ):
            return self.inner.aggregate_train(server_round, replies)


class Cohorts(StrategyWrapper):
    """Around a strategy: fedsim's own cohort each round, and replies in client order.

    Flower's strategies sample nodes with an unseeded ``random.sample`` and average
    replies in arrival order, so two runs with one seed would differ; and the cohort is
    part of a DP mechanism (``fedsim.dp.randomness``). The wrapped strategy still
    configures the round (its template message is sent, once checked to hold the run's
    config unchanged; it keeps the arrays its server optimizer updates) and aggregates.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        num_clients: int,
        nodes: list[int],
        bound: bool,
        clients_per_round: int,
        root: bytes,
        poisson: bool = False,
    ) -> None:
        super().__init__(inner)
        self.num_clients, self.clients_per_round = num_clients, clients_per_round
        self.nodes, self.bound = nodes, bound
        self.root, self.poisson = root, poisson

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to this round's sample of clients."""
        # the strategy gets a copy: one that edits the config it is given (FedAvg adds the
        # round) must not change the run's config, nor what its template is checked against
        given = ConfigRecord(dict(config))
        made = next(iter(self.inner.configure_train(server_round, arrays, given, grid)), None)
        template = made.content.config_records[CONFIG] if made is not None else given
        name = getattr(self.inner, "name", type(self.inner).__name__)
        _check_template(template, config, name, server_round)
        chosen = sample_clients(
            self.num_clients,
            self.clients_per_round,
            root=self.root,
            server_round=server_round,
            poisson=self.poisson,
        )
        nodes = place(chosen, self.nodes, bound=self.bound)
        return [
            Message(train_content(arrays, template, server_round, client), node, MessageType.TRAIN)
            for client, node in zip(chosen, nodes, strict=True)
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate in client order, so float sums do not depend on arrival order."""
        return self.inner.aggregate_train(server_round, sorted(replies, key=client_of))


def _check_template(
    template: ConfigRecord, run: ConfigRecord, strategy: str, server_round: int
) -> None:
    """Refuse a round's train config that is not the run's own, key for key.

    Clients train as the message says, but the privacy ledger (the spend charged to a
    silent client, the σ solved for the schedule) and ``summary.json`` follow the run's
    config: a strategy that turned ``dp`` off or changed ``local-epochs`` in a round
    would make the reported ε wrong. A key the run's config lacks is refused too (clients
    refuse it: ``fedsim.messages.decode_config``). Keys equal to the run's (FedProx's
    ``proximal-mu``) and the round number pass.
    """
    for key in sorted((set(template) | set(run)) - {ROUND_KEY}):
        if key not in run:
            change = f"added key '{key}'"
        elif key not in template:
            change = f"dropped key '{key}'"
        elif template[key] != run[key]:
            change = f"changed '{key}' from {run[key]!r} to {template[key]!r}"
        else:
            continue
        raise FedsimError(
            f"strategy '{strategy}' {change} in round {server_round}'s train config; clients "
            "take the run's config and nothing else (the privacy ledger and summary.json "
            "count it): set fedsim's keys in the run's config, not per round"
        )


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
