"""An in-process Flower Grid that runs the real ClientApp for each simulated site.

Benchmarks compare many configurations; starting a SuperLink and Ray for each costs seconds
per round that have nothing to do with the method. ``LocalGrid`` keeps the real code paths
(our strategies' ``Strategy.start`` loop, the real ``ClientApp`` with its message contract,
per-node ``Context`` with ``node_config`` and ``state``) and only replaces the transport:
every instruction is copied (as if serialised), handled by the site's ClientApp, and the
reply wrapped as Flower would. Sites run one after another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


def copy_content(content: RecordDict) -> RecordDict:
    """Deep copy of a RecordDict, as if it had crossed the network."""
    out = RecordDict()
    for key, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[key] = ArrayRecord({k: Array(np.array(v.numpy(), copy=True)) for k, v in rec.items()})
        elif isinstance(rec, MetricRecord):
            out[key] = MetricRecord(dict(rec))
        elif isinstance(rec, ConfigRecord):
            out[key] = ConfigRecord(dict(rec))
        else:
            raise TypeError(f"unsupported record type {type(rec).__name__}")
    return out


class InProcessGrid(Grid):
    """The parts of Flower's Grid an in-process transport needs besides ``send_and_receive``."""

    _run = None

    def set_run(self, run) -> None:  # noqa: ANN001
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError(f"{type(self).__name__} only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError(f"{type(self).__name__} only supports send_and_receive")


class LocalGrid(InProcessGrid):
    """Nodes 1..N, each a ClientApp with its own Context (node_config, persistent state)."""

    def __init__(self, client_app: Any, node_configs: list[Mapping[str, Any]], run_config: Mapping[str, Any],
                 run_id: int = 1) -> None:
        self.client_app = client_app
        self.contexts = {
            node_id: Context(run_id=run_id, node_id=node_id, node_config=dict(cfg), state=RecordDict(),
                             run_config=dict(run_config))
            for node_id, cfg in enumerate(node_configs, start=1)
        }
        # Messages need a task identity; outside a Flower process nobody has set one.
        if getattr(TaskIdentity, "_run_id", None) is None:
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            received = Message(content=copy_content(msg.content), dst_node_id=node,
                               message_type=msg.metadata.message_type)
            try:
                answer = self.client_app(received, self.contexts[node])
                replies.append(Message(copy_content(answer.content), reply_to=msg))
            except Exception as exc:  # the site failed: Flower would send an error reply
                replies.append(Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        return replies
