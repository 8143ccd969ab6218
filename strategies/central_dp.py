"""Central (user-level) DP: Flower's fixed-clipping wrappers around our FedAvg/FedProx.

Run config ``central-dp=server-side`` wraps the strategy in Flower's
``DifferentialPrivacyServerSideFixedClipping`` (the server clips each site's update to
``central-dp-clipping-norm``), ``client-side`` in ``DifferentialPrivacyClientSideFixedClipping``
(each site clips its own update with Flower's ``fixedclipping_mod`` before it leaves; see
``app.site_mods.site_clipping_mod``). Either way Gaussian noise with standard deviation
``noise_multiplier * clip / n`` is added to the aggregate, which protects whole sites
(user-level DP, McMahan et al. 2018), not patients: per-site DP-SGD (``dp-epsilon``) does that.

Everything central-DP lives here: the strategy inside the wrapper is an unmodified fedimaging
FedAvg/FedProx; :func:`wrap` adds a :class:`CentralDPExtension` to it (the generic hooks of
:mod:`strategies.extension`) and returns the Flower wrapper that drives the rounds.

What we add around Flower's wrappers (DESIGN notes):

* **Fixed denominator.** Flower calibrates the noise for a uniform mean over ``n`` sites; our
  FedAvg weights by case count. Under central DP the strategy averages *uniformly* with the
  fixed denominator ``n`` (:func:`denominator`): new = current +
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
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from . import validation
from .aggregation import fixed_denominator_mean, update_norm
from .extension import StrategyExtension
from .records import Arrays, SiteUpdate
from .settings import StrategySettings

if TYPE_CHECKING:
    from .base import FedImagingFedAvg

# Central (user-level) DP modes: Flower's fixed-clipping wrappers.
CENTRAL_DP_MODES = ("off", "server-side", "client-side")
# Strategies whose aggregate is a plain mean of the sites' models, the quantity the wrappers'
# noise is calibrated for (median, trimmed mean, a server optimizer, SCAFFOLD's extra arrays
# and FedBN's site-local layers are not).
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")


def new_noise_secret() -> str:
    """A fresh per-run secret for the central noise (hex)."""
    return secrets.token_hex(32)


def epsilon_spent(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon after ``releases`` Gaussian releases without subsampling (the ledger's Opacus RDP, q = 1)."""
    from privacy.ledger import epsilon_of  # lazy: the server only needs it with central DP on

    return epsilon_of([(noise_multiplier, 1.0, releases)], delta) if releases > 0 else 0.0


def denominator(s: StrategySettings) -> int:
    """Sites per round the noise is calibrated for (DP-FedAvg's fixed denominator).

    ``central-dp-sites``, else what the sampler picks from ``min-available-sites`` sites.
    """
    if s.central_dp_sites:
        return s.central_dp_sites
    population = max(1, s.min_available_sites)
    return min(population, max(int(population * s.fraction_train), s.min_train_sites, 1))


def _noise_seed(secret: str, server_round: int) -> np.ndarray:
    digest = hashlib.sha256(f"{secret}:{server_round}".encode()).digest()
    return np.frombuffer(digest, dtype=np.uint32)


class CentralDPExtension(StrategyExtension):
    """What the wrapped strategy does differently under central DP, through its generic hooks."""

    state_key = "central-dp"

    def __init__(self, settings: StrategySettings) -> None:
        self.settings = settings
        self.secret = new_noise_secret()
        self.releases = 0

    def check_model(self, arrays: Mapping[str, Any]) -> None:
        integer = sorted(k for k, v in arrays.items() if not np.issubdtype(np.asarray(v).dtype, np.floating))
        if integer:
            raise ValueError(
                f"central-dp={self.settings.central_dp!r} clips and noises every array, but the model has "
                f"non-float arrays {integer[:3]}: build it DP-compatible (no BatchNorm)"
            )

    def check_update(self, sent: Arrays, update: SiteUpdate) -> str | None:
        """Client-side: the sites clip; an update above the bound means a site did not."""
        s = self.settings
        if s.central_dp != "client-side":
            return None
        norm = update_norm(sent, update.arrays)
        if norm > s.central_dp_clipping_norm * (1 + 1e-4):
            return (f"update norm {norm:.4g} exceeds central-dp-clipping-norm "
                    f"{s.central_dp_clipping_norm:g}: the site did not clip")
        return None

    def aggregate(self, server_round: int, current: Arrays, updates: list[SiteUpdate]) -> Arrays:
        """Uniform mean with the fixed denominator (more sites than planned only lowers each weight)."""
        n = max(denominator(self.settings), len(updates))
        return fixed_denominator_mean(current, [u.arrays for u in updates], n)

    def train_line(self, server_round: int, released: bool) -> dict[str, Any]:
        """Count a noisy release (Flower's wrapper adds the noise to what the strategy returns)."""
        s = self.settings
        if released:
            self.releases += 1
        n = denominator(s)
        return {"central-dp": {
            "mode": s.central_dp,
            "noise-multiplier": s.central_dp_noise_multiplier,
            "clipping-norm": s.central_dp_clipping_norm,
            "sites-denominator": n,
            "noise-std": s.central_dp_noise_multiplier * s.central_dp_clipping_norm / n,
            "releases": self.releases,
            "delta": s.central_dp_delta,
            "epsilon": epsilon_spent(s.central_dp_noise_multiplier, self.releases, s.central_dp_delta),
        }}

    def state(self) -> dict[str, Any]:
        return {"secret": self.secret, "releases": self.releases}

    def restore(self, state: Mapping[str, Any] | None, root: str) -> None:
        if not state or not state.get("secret"):
            raise ValueError(f"resume-from={root!r} was not a central-DP run; cannot add central DP now")
        self.secret = str(state["secret"])
        self.releases = int(state.get("releases", 0))


class _GuardedWrapper:
    """Mixin for Flower's fixed-clipping wrappers: withhold unclippable replies, seeded noise."""

    strategy: FedImagingFedAvg
    extension: CentralDPExtension

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        inner = self.strategy
        usable, aside = [], []
        for msg in replies:
            (usable if _clippable(inner, msg) else aside).append(msg)
        # screened by the strategy like any reply; never aggregated unclipped
        inner.withhold(aside, "update could not be clipped for central DP")
        saved = np.random.get_state()
        np.random.seed(_noise_seed(self.extension.secret, inner.absolute_round(server_round)))
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
    """Flower's DP wrapper selected by ``settings.central_dp`` around ``strategy``.

    The strategy gets the :class:`CentralDPExtension` and the wrapper as its ``driver`` (the
    object whose ``Strategy.start`` runs the rounds); its class is unchanged.
    """
    s = strategy.settings
    if s.strategy not in CENTRAL_DP_STRATEGIES:
        raise ValueError(f"central-dp needs strategy {' or '.join(CENTRAL_DP_STRATEGIES)}, not {s.strategy!r}")
    extension = CentralDPExtension(s)
    strategy.extensions.append(extension)
    wrapper = WRAPPERS[s.central_dp](strategy, s.central_dp_noise_multiplier, s.central_dp_clipping_norm,
                                     denominator(s))
    wrapper.extension = extension
    strategy.driver = wrapper
    return wrapper
