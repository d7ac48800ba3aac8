"""The round loop: train, screen replies, aggregate, evaluate, checkpoint.

Flower's ``Strategy.start`` always counts rounds from 1 and keeps no state between
calls; this loop can start at any round (resume) and stop cleanly after one (Ctrl-C).
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.errors import FedsimError, RunInterrupted
from fedsim.messages import DROPOUT, model_arrays
from fedsim.server.strategy import client_of

EvalFn = Callable[[int, ArrayRecord, dict[int, str]], None]
ReplyFn = Callable[[int, int, int], None]  # (round, replies so far, messages sent)
PULL_INTERVAL_S = 0.1  # deployment: each pull is a request to the SuperLink
# simulation: a pull is a lookup in memory, and at 0.1 s the wait was a fifth of a GPU
# round of 10 clients (docs/benchmarks.md)
SIMULATION_PULL_S = 0.005
# a reason that is the client's own error text (which may quote its data) starts so
RAISED = "error: "
STOP_NOTE = "withheld (it can quote the client's data; --verbose shows Flower's log of it)"
# errors of the SuperLink's own making: their texts are Flower's, not the client's
_LINK_ERRORS = frozenset(
    {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE}
)


def _reason(reason: str | None) -> str:
    """The client's own message out of Flower's "<class ...>:<'... Message: ...'>" wrapping.

    The deployment engine leaves out the "Message: " part: "<class '...'>:<'...'>".
    """
    text = (reason or "").rsplit("Message: ", 1)[-1].strip().removesuffix("'>")
    text = re.sub(r"^<class '[^']*'>:<'", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def withheld(dropped: dict[int, str], note: str) -> dict[int, str]:
    """``dropped`` with the text of each error a client raised replaced by ``note``.

    Under sample-level DP the readers of the results (and of a run's console, which a
    sweep keeps with its results) are not trusted, and such a text can quote the
    client's data.
    """
    return {c: RAISED + note if r.startswith(RAISED) else r for c, r in dropped.items()}


def _error_reason(reply: Message) -> str:
    """Why a client's error reply has no update; its own error's text marked :data:`RAISED`."""
    text = _reason(reply.error.reason)
    if reply.error.code in _LINK_ERRORS or text.startswith(DROPOUT):
        return text
    return RAISED + text


def screen_replies(
    messages: list[Message], replies: list[Message], timeout: float
) -> tuple[list[Message], dict[int, str]]:
    """Split replies into usable ones and ``{client: reason}`` for every client left out.

    A reason that is the text of an error the client raised starts with :data:`RAISED`.
    Replies are matched to messages by message id: where a SuperNode stopped sending
    heartbeats, the reply is the SuperLink's own error ("Node Unavailable"), sent from
    the SuperLink's node id, not from the client's.
    """
    by_message = {m.metadata.reply_to_message_id: m for m in replies}
    sent = {m.metadata.message_id for m in messages}
    by_node: dict[int, list[Message]] = {}  # replies that name no message sent
    for m in replies:
        if m.metadata.reply_to_message_id not in sent:
            by_node.setdefault(m.metadata.src_node_id, []).append(m)
    good, dropped = [], {}
    for msg in messages:
        node, client = msg.metadata.dst_node_id, client_of(msg)
        reply = by_message.get(msg.metadata.message_id) if msg.metadata.message_id else None
        if reply is None and len(by_node.get(node, [])) == 1:
            reply = by_node[node][0]
        if reply is None:
            dropped[client] = f"no reply within round-timeout ({timeout:g} s)"
        elif reply.has_error():
            dropped[client] = _error_reason(reply)
        elif not all(np.isfinite(a.numpy()).all() for a in model_arrays(reply.content).values()):
            dropped[client] = "returned non-finite (NaN or infinite) weights"
        else:
            good.append(reply)
    return good, dropped


def exchange(
    grid: Grid,
    messages: list[Message],
    *,
    timeout: float,
    on_reply: Callable[[int, int], None],
    abandon: threading.Event | None = None,
    poll_s: float = PULL_INTERVAL_S,
) -> list[Message]:
    """Send ``messages``; collect replies until all are in or ``timeout`` seconds pass.

    Flower's ``send_and_receive`` does the same but says nothing until the end;
    ``on_reply`` gets (replies so far, messages sent) each time more arrive. Once
    ``abandon`` is set the round is given up (:class:`RunInterrupted`) within ``poll_s``,
    the seconds between pulls: its replies are dropped unread, nothing of it is released.
    """
    abandon = abandon or threading.Event()
    if abandon.is_set():
        raise RunInterrupted("stopped before the round began")
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        if abandon.is_set():
            raise RunInterrupted("stopped during a round; it is run again on resume")
        arrived = list(grid.pull_messages(waiting))
        if not arrived:
            time.sleep(poll_s)
            continue
        replies += arrived
        waiting -= {m.metadata.reply_to_message_id for m in arrived}
        on_reply(len(replies), len(messages))
    return replies


def _silent(*_: int) -> None:
    pass


def too_few(
    server_round: int,
    good: list[Message],
    sent: list[Message],
    dropped: dict[int, str],
    min_clients: int,
) -> str:
    """The line a round with too few usable replies stops the run with (public cohorts)."""
    return (
        f"round {server_round}: {len(good)} of {len(sent)} clients replied, min-clients is "
        f"{min_clients} ({why_dropped(dropped)})"
    )


def why_dropped(dropped: dict[int, str]) -> str:
    """Each reason once, with the clients it stopped: ``clients 0, 3: ...; client 2: ...``."""
    clients: dict[str, list[int]] = {}
    for client, reason in sorted(dropped.items()):
        clients.setdefault(reason, []).append(client)
    return "; ".join(
        f"client{'s' * (len(ids) > 1)} {', '.join(map(str, ids))}: {reason}"
        for reason, ids in clients.items()
    )


def keep_schema(new: ArrayRecord, old: ArrayRecord) -> ArrayRecord:
    """``new`` with ``old``'s names and dtypes: the model the clients load stays one model.

    Flower's strategies average every array as a float, so a BatchNorm's step counter
    would reach the clients (and the checkpoint) as a float64 mean; it is cast back, as
    ``load_state_dict`` would. A strategy that adds or drops an array is refused here, in
    one line, not in every client.
    """
    if new.keys() != old.keys():
        missing, extra = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
        raise FedsimError(
            f"the strategy returned a model whose arrays differ from the global model's "
            f"(missing {missing}, extra {extra}); return an array for each name the global "
            "model has, and no other"
        )
    if all(new[k].dtype == old[k].dtype for k in old):
        return new
    return ArrayRecord(
        {k: Array(np.asarray(v.numpy()).astype(old[k].dtype)) for k, v in new.items()}
    )


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    rounds: range,
    train_config: ConfigRecord,
    timeout: float,
    min_clients: int,
    on_round: EvalFn,
    stop: threading.Event | None = None,
    on_reply: ReplyFn | None = None,
    abandon: bool = False,
    poll_s: float = PULL_INTERVAL_S,
    secret: bool = False,
    withhold: bool = False,
) -> ArrayRecord:
    """Run ``rounds`` of federated training from ``arrays``; return the final arrays.

    ``on_round`` gets (round, new arrays, dropped clients with reasons) after each round;
    it evaluates and checkpoints. The strategy's aggregate is the next global model (its
    server optimizer included). A round with fewer than ``min_clients`` usable
    replies stops the run with the reasons; a Poisson cohort may be empty, and then the
    strategy alone decides. Inside a round ``on_reply`` hears (round, replies, sent)
    each time more clients have replied. Once ``stop`` is set the run stops after the
    round, or at once with ``abandon`` (where replies dropped unread release nothing:
    a simulation, whose server is trusted). ``poll_s``: seconds between pulls for replies.
    ``secret``: cohorts are private (user-level DP), so failures never stop the run.
    ``withhold``: the line a stop ends with says no client's error text (sample-level DP).
    """
    for server_round in rounds:
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        report = functools.partial(on_reply or _silent, server_round)
        report(0, len(messages))
        replies = exchange(
            grid,
            messages,
            timeout=timeout,
            on_reply=report,
            abandon=stop if abandon else None,
            poll_s=poll_s,
        )
        good, dropped = screen_replies(messages, replies, timeout)
        new_arrays, _ = strategy.aggregate_train(server_round, good)
        # under private cohorts a stop would tell of the failures, which can come from a
        # client's data: failed clients count as zero in the released round instead
        if not secret and len(good) < min(min_clients, len(messages)):
            said = withheld(dropped, STOP_NOTE) if withhold else dropped
            raise FedsimError(too_few(server_round, good, messages, said, min_clients))
        if new_arrays is None:
            which = "the round's replies" if secret else f"{len(good)} replies"
            raise FedsimError(
                f"round {server_round}: the strategy's aggregate_train returned no model "
                f"from {which}; return the new global ArrayRecord"
            )
        arrays = keep_schema(new_arrays, arrays)
        on_round(server_round, arrays, dropped)
        if stop is not None and stop.is_set() and server_round != rounds[-1]:
            raise RunInterrupted(f"stopped after round {server_round}")
    return arrays
