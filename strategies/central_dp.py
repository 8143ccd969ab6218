"""Central (user-level) DP: Flower's fixed-clipping wrappers around our FedAvg/FedProx.

Run config ``central-dp=server-side`` wraps the strategy in Flower's
``DifferentialPrivacyServerSideFixedClipping`` (the server clips each site's update to
``central-dp-clipping-norm``), ``client-side`` in ``DifferentialPrivacyClientSideFixedClipping``
(each site clips its own update with Flower's ``fixedclipping_mod`` before it leaves; see
:func:`site_clipping_mod`). Either way Gaussian noise with standard deviation
``noise_multiplier * clip / n`` is added to the aggregate, which protects whole sites
(user-level DP, McMahan et al. 2018), not patients: per-site DP-SGD (``dp-epsilon``) does that.

What we add around Flower's wrappers (DESIGN notes):

* **Fixed denominator.** Flower calibrates the noise for a uniform mean over ``n`` sites; our
  FedAvg weights by case count. Under central DP the strategy averages *uniformly* with the
  fixed denominator ``n`` (``StrategySettings.central_dp_denominator``): new = current +
  sum(clipped updates) / n, so one site moves the model by at most clip / n whether or not the
  others answered, and the noise matches that sensitivity.
* **Accounting.** Flower's accountant only accepts its own unmodified ``FedAvg.aggregate_train``
  (and needs the ``dp-accounting`` package, not installed); the strategy therefore counts the
  noisy releases and reports epsilon with Opacus's RDP accountant at sampling rate 1 (every
  release is a Gaussian mechanism without subsampling amplification) in ``metrics.jsonl``.
* **Robustness.** Replies that clipping cannot handle (error replies, wrong array names or
  shapes) are set aside before Flower's wrapper sees them (it would skip the whole round on an
  error reply, or crash on a shape mismatch); our screening then excludes them with the reason.
* **Noise seed.** Flower draws the noise from NumPy's global generator. We seed it per round
  from a secret created with the run and kept in the run directory's server state, never from
  the public ``seed``: sites that know the seed could otherwise regenerate and subtract the
  noise. A resumed run therefore adds the same noise as an uninterrupted one; two fresh runs
  with the same seed do not.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from . import validation

if TYPE_CHECKING:
    from .base import FedImagingFedAvg


def new_noise_secret() -> str:
    """A fresh per-run secret for the central noise (hex)."""
    return secrets.token_hex(32)


def epsilon_spent(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon after ``releases`` Gaussian releases without subsampling (the ledger's Opacus RDP, q = 1)."""
    from privacy.ledger import epsilon_of  # lazy: the server only needs it with central DP on

    return epsilon_of([(noise_multiplier, 1.0, releases)], delta) if releases > 0 else 0.0


def _noise_seed(secret: str, server_round: int) -> np.ndarray:
    digest = hashlib.sha256(f"{secret}:{server_round}".encode()).digest()
    return np.frombuffer(digest, dtype=np.uint32)


class _GuardedWrapper:
    """Mixin for Flower's fixed-clipping wrappers: set aside unclippable replies, seeded noise."""

    strategy: FedImagingFedAvg

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        inner = self.strategy
        usable, aside = [], []
        for msg in replies:
            if _clippable(inner, msg):
                usable.append(msg)
            else:
                aside.append(msg)
        inner.set_aside_replies(aside)
        saved = np.random.get_state()
        np.random.seed(_noise_seed(inner.central_dp_secret, inner._round(server_round)))
        try:
            return super().aggregate_train(server_round, usable)  # type: ignore[misc]
        finally:
            np.random.set_state(saved)


def _clippable(inner: FedImagingFedAvg, msg: Message) -> bool:
    """No error, and either no arrays (a refusal) or exactly the arrays that were sent.

    Flower's clipping pairs arrays by position, so a reply with the right names in another order
    is put into the order that was sent (in place) rather than clipped against the wrong arrays.
    """
    if msg.has_error():
        return False
    records = msg.content.array_records
    if not records:
        return True
    if list(records) != [inner.arrayrecord_key]:
        return False
    record = records[inner.arrayrecord_key]
    arrays = {k: v.numpy() for k, v in record.items()}
    if validation.check_arrays(inner.sent_arrays, arrays) is not None or set(arrays) != set(inner.sent_arrays):
        return False
    if list(arrays) != list(inner.sent_arrays):
        msg.content[inner.arrayrecord_key] = ArrayRecord({k: record[k] for k in inner.sent_arrays})
    return True


class ServerSideClipping(_GuardedWrapper, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping around a fedimaging strategy."""


class ClientSideClipping(_GuardedWrapper, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping around a fedimaging strategy."""


WRAPPERS = {"server-side": ServerSideClipping, "client-side": ClientSideClipping}


def wrap(strategy: FedImagingFedAvg) -> Any:
    """The Flower DP wrapper selected by ``settings.central_dp`` around ``strategy``."""
    s = strategy.settings
    cls = WRAPPERS[s.central_dp]
    return cls(strategy, s.central_dp_noise_multiplier, s.central_dp_clipping_norm, s.central_dp_denominator)


def site_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp train mod: Flower's ``fixedclipping_mod`` when the server asks for it.

    Only train messages that carry Flower's clipping-norm key are clipped (client-side central
    DP); everything else passes through. A refusal (a reply without arrays, e.g. an exhausted
    privacy budget) is returned as it is rather than turned into an error.
    """
    config = msg.content.config_records.get("config")
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    inner: dict[str, Message] = {}

    def capture(m: Message, c: Context) -> Message:
        inner["reply"] = call_next(m, c)
        return inner["reply"]

    out = fixedclipping_mod(msg, context, capture)
    reply = inner.get("reply")
    if reply is not None and not reply.has_error() and not reply.content.array_records:
        return reply
    return out
