"""In-process stand-ins for Flower's Grid and for sites, so ``Strategy.start`` runs end to end.

A site is any callable ``(message) -> RecordDict | Error``; :class:`FakeGrid` copies every
instruction (like the wire would), calls the site of the destination node and wraps the answer in
a proper reply ``Message(content, reply_to=instruction)``. Reply order is shuffled with a seed so
tests can check that aggregation does not depend on arrival order.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from app.config import parse_run_config, strategy_settings
from bench.local_grid import InProcessGrid, copy_content
from strategies import StrategySettings

Site = Callable[[Message], "RecordDict | Error"]


# Small runs for the numpy sites: the run config's keys, with test-sized values.
SMALL_RUN = {"num_server_rounds": 3, "local_epochs": 1, "lr": 1e-3, "lr_schedule": "constant", "best_metric": "dice"}


def small_settings(min_available_sites: int = 2, unseen_site: bool = False, **run_keys) -> StrategySettings:
    """StrategySettings as the ServerApp derives them, from run-config keys (snake_case here).

    Goes through the one validation (``app.config``); ``min_available_sites`` is the number of
    sites the study waits for, ``unseen_site`` whether one evaluates on the demo's unseen site.
    """
    raw = {k.replace("_", "-"): v for k, v in {**SMALL_RUN, **run_keys}.items()}
    run = parse_run_config(raw)
    settings = strategy_settings(run, run.best_metric, min_available_sites)
    return dataclasses.replace(settings, unseen_site=unseen_site)


class Interrupted(RuntimeError):
    """Raised by FakeGrid to simulate the server dying at a given round."""


class FakeGrid(InProcessGrid):
    """Minimal Grid: fixed node ids, synchronous send_and_receive, optional interruption."""

    def __init__(self, sites: dict[int, Site], shuffle_seed: int | None = 0,
                 interrupt_at_round: int | None = None, interrupt_phase: str = "train") -> None:
        self.sites = dict(sites)
        self._shuffle = random.Random(shuffle_seed) if shuffle_seed is not None else None
        self.interrupt_at_round = interrupt_at_round
        self.interrupt_phase = interrupt_phase
        self.sent: list[Message] = []

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
