"""In-process stand-ins for Flower's Grid and for sites, so ``Strategy.start`` runs end to end.

A site is any callable ``(message) -> RecordDict | Error``; :class:`FakeGrid` copies every
instruction (like the wire would), calls the site of the destination node and wraps the answer in
a proper reply ``Message(content, reply_to=instruction)``. Reply order is shuffled with a seed so
tests can check that aggregation does not depend on arrival order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

Site = Callable[[Message], "RecordDict | Error"]


class Interrupted(RuntimeError):
    """Raised by FakeGrid to simulate the server dying at a given round."""


def copy_content(content: RecordDict) -> RecordDict:
    """Deep copy of a RecordDict (arrays copied), as if it had been serialised."""
    out = RecordDict()
    for key, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[key] = ArrayRecord({k: Array(np.array(v.numpy(), copy=True)) for k, v in rec.items()})
        elif isinstance(rec, MetricRecord):
            out[key] = MetricRecord(dict(rec))
        elif isinstance(rec, ConfigRecord):
            out[key] = ConfigRecord(dict(rec))
        else:  # pragma: no cover - not used by fedimaging
            raise TypeError(type(rec))
    return out


class FakeGrid(Grid):
    """Minimal Grid: fixed node ids, synchronous send_and_receive, optional interruption."""

    def __init__(self, sites: dict[int, Site], shuffle_seed: int | None = 0,
                 interrupt_at_round: int | None = None, interrupt_phase: str = "train") -> None:
        self.sites = dict(sites)
        self._shuffle = random.Random(shuffle_seed) if shuffle_seed is not None else None
        self.interrupt_at_round = interrupt_at_round
        self.interrupt_phase = interrupt_phase
        self.sent: list[Message] = []
        self._run = None

    # --- Grid API used by the strategies --------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            cfg = msg.content.config_records.get("config")
            if (self.interrupt_at_round is not None and cfg is not None
                    and cfg.get("server-round") == self.interrupt_at_round
                    and msg.metadata.message_type == self.interrupt_phase):
                raise Interrupted(f"simulated crash at round {self.interrupt_at_round}")
        replies = []
        for msg in messages:
            self.sent.append(msg)
            received = Message(content=copy_content(msg.content), dst_node_id=msg.metadata.dst_node_id,
                               message_type=msg.metadata.message_type)
            answer = self.sites[msg.metadata.dst_node_id](received)
            if isinstance(answer, Error):
                replies.append(Message(answer, reply_to=msg))
            else:
                replies.append(Message(copy_content(answer), reply_to=msg))
        if self._shuffle is not None:
            self._shuffle.shuffle(replies)
        return replies

    # --- rest of the abstract surface -------------------------------------------------------
    def set_run(self, run) -> None:  # noqa: ANN001
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("FakeGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("FakeGrid only supports send_and_receive")


def train_reply(arrays: dict[str, np.ndarray], num_examples: int, site: str, **metrics: float) -> RecordDict:
    """A train reply following the message contract."""
    return RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
        "site": ConfigRecord({"site-name": site}),
    })


def eval_reply(num_examples: int, site: str, **metrics: float) -> RecordDict:
    """An evaluate reply following the message contract."""
    return RecordDict({
        "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
        "site": ConfigRecord({"site-name": site}),
    })


def refusal(site: str, reason: str) -> RecordDict:
    """A site refusing to train (e.g. privacy budget exhausted)."""
    return RecordDict({
        "metrics": MetricRecord({"num-examples": 0, "refused": 1}),
        "site": ConfigRecord({"site-name": site, "refused-reason": reason}),
    })


def reply_to(node_id: int, content: RecordDict | Error, message_type: str = "train") -> Message:
    """A reply Message from ``node_id`` without going through a grid."""
    instruction = Message(content=RecordDict(), dst_node_id=node_id, message_type=message_type)
    return Message(content, reply_to=instruction)


def arrays_of(msg: Message, key: str = "arrays") -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content.array_records[key].items()}
