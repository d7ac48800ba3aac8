"""A grid that sends each simulation worker several clients' train messages as one.

With ``clients-per-worker`` > 1 a worker trains a group of clients in one vectorized
step (``fedsim.dp.train_cohort``). Everything above the grid (cohorts, the ledger,
user-level DP, screening of replies) still sees one message and one reply per client:
``push_messages`` groups the clients' messages, and ``pull_messages`` splits each group
reply back into per-client replies, each one a reply to its client's own message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from flwr.app import Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsim.messages import (
    ARRAYS,
    CONFIG,
    PARTITION_KEY,
    group_content,
    named_partition,
    split_group_reply,
)
from fedsim.server.rounds import SIMULATION_PULL_S

GROUP_FAILED = 1  # Flower error code of a client whose group failed as a whole


class GroupedGrid(Grid):
    """``inner``, with train messages for one node sent in groups of ``per_worker``.

    Only messages that name their client (simulation workers) and share one model and
    one config are grouped; any other message passes through unchanged.
    """

    def __init__(self, inner: Grid, per_worker: int) -> None:
        self.inner, self.per_worker = inner, per_worker
        self.pending: dict[str, list[Message]] = {}  # group message id -> its clients' messages

    def set_run(self, run: Run) -> None:
        """Delegate to the wrapped grid."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegate to the wrapped grid."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate to the wrapped grid."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push ``messages``, train messages of one node and model in groups; their ids."""
        messages = list(messages)
        groups: dict[tuple, list[Message]] = {}
        for msg in messages:
            if _groupable(msg):
                groups.setdefault(_group_key(msg), []).append(msg)
            else:
                self.inner.push_messages([msg])  # Flower sets its message id
        for members in groups.values():
            for at in range(0, len(members), self.per_worker):
                self._push_group(members[at : at + self.per_worker])
        return [msg.metadata.message_id for msg in messages]

    def _push_group(self, members: list[Message]) -> None:
        first = members[0]
        clients = [_client(m) for m in members]
        content = group_content(first.content, clients)
        group = Message(content, first.metadata.dst_node_id, MessageType.TRAIN)
        (group_id,) = self.inner.push_messages([group])
        for msg in members:  # as Flower's grids do: a message's id is set when it is pushed
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        self.pending[group_id] = members

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies to any of ``message_ids``; a group's reply comes back split by client."""
        wanted = set(message_ids)
        groups = {
            gid
            for gid, members in self.pending.items()
            if any(m.metadata.message_id in wanted for m in members)
        }
        own = wanted - {m.metadata.message_id for g in groups for m in self.pending[g]}
        replies: list[Message] = []
        for reply in self.inner.pull_messages(own | groups):
            members = self.pending.pop(reply.metadata.reply_to_message_id, None)
            replies += [reply] if members is None else _split(reply, members)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all are in or ``timeout`` passes."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            arrived = list(self.pull_messages(waiting))
            replies += arrived
            waiting -= {m.metadata.reply_to_message_id for m in arrived}
            if not arrived:
                time.sleep(SIMULATION_PULL_S)  # grouping is for simulations only
        return replies


def _groupable(msg: Message) -> bool:
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and msg.has_content()
        and named_partition(msg.content) is not None
    )


def _client(msg: Message) -> int:
    client = named_partition(msg.content)
    if client is None:  # _groupable let only named messages through
        raise ValueError("a grouped message names no client")
    return client


def _group_key(msg: Message) -> tuple:
    """Messages group when they go to one node with one model and one config.

    The model is compared by identity: a strategy sends every client the same record,
    and hashing megabytes of weights once per client would cost more than it saves.
    """
    config = msg.content[CONFIG]
    rest = tuple(sorted((k, repr(v)) for k, v in config.items() if k != PARTITION_KEY))
    return msg.metadata.dst_node_id, id(msg.content[ARRAYS]), rest


def _split(reply: Message, members: list[Message]) -> list[Message]:
    """One reply per client of a group: its own content, or the error that stopped it."""
    if reply.has_error():
        return [Message(reply.error, reply_to=m) for m in members]
    parts = split_group_reply(reply.content, [_client(m) for m in members])
    out = []
    for msg in members:
        part = parts[_client(msg)]
        if isinstance(part, str):
            out.append(Message(Error(GROUP_FAILED, part), reply_to=msg))
        else:
            out.append(Message(part, reply_to=msg))
    return out
