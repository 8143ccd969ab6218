"""FedImagingFedAvg: Flower's FedAvg with fedimaging's round bookkeeping.

What it adds to ``flwr.serverapp.strategy.FedAvg`` (and every variant inherits):
- replies are screened one by one (:mod:`strategies.screening`): a bad reply is excluded with a
  reason in ``metrics.jsonl`` and the round goes on (Flower's own check raises instead);
- case-weighted aggregation by pure functions (:mod:`strategies.aggregation`), replies sorted by
  site name so the result does not depend on arrival order, dtypes preserved;
- deterministic site sampling from the run seed (:mod:`strategies.sampling`);
- the learning rate of each round, decided here and sent to the sites (``settings.round_lr``);
- ``metrics.jsonl`` lines, checkpoints and the server state (:mod:`strategies.server_state`),
  and ``run()``: resume, Flower's loop, final outputs, cross-site (:mod:`strategies.run_loop`).

Variants override one hook: ``round_train_config`` (FedProx), ``aggregate_arrays`` (FedAdam,
FedYogi, FedMedian, FedTrimmedAvg), ``shared_keys`` (FedBN); SCAFFOLD also adds its variate to
the train message and checks the reply's ``scaffold-delta-c``. Wrappers (central DP) add
:class:`~strategies.extension.StrategyExtension` hooks to an instance instead of subclassing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from flwr.supercore import log

from . import run_loop, server_state
from .aggregation import server_step, weighted_mean
from .extension import StrategyExtension
from .metrics import WEIGHT_KEY, received_model_mean, weighted_site_mean
from .records import Arrays, SiteUpdate, to_numpy, to_record
from .run_dir import RunDirectory
from .sampling import SiteSampler
from .screening import ReplyScreener, apply_norm_bound
from .settings import StrategySettings

EvaluateFn = Callable[[int, ArrayRecord], "MetricRecord | None"]


class FedImagingFedAvg(FedAvg):
    """Case-weighted FedAvg with screening, metrics log, checkpoints and resume (see module doc)."""

    def __init__(
        self,
        settings: StrategySettings,
        run_dir: RunDirectory,
        local_param_names: frozenset[str] = frozenset(),
        frozen_param_names: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(
            fraction_train=settings.fraction_train,
            fraction_evaluate=settings.fraction_evaluate,
            min_train_nodes=settings.min_train_sites,
            min_evaluate_nodes=settings.min_evaluate_sites,
            min_available_nodes=settings.min_available_sites,
            weighted_by_key=WEIGHT_KEY,
        )
        self.settings = settings
        self.run_dir = run_dir
        self.local_param_names = frozenset(local_param_names)
        # Run config freeze: sent to the sites, never expected back; the global model keeps its own.
        self.frozen_param_names = frozenset(frozen_param_names)
        self.sampler = SiteSampler(settings.seed)
        self.screener = ReplyScreener()
        self.extensions: list[StrategyExtension] = []
        self.round_offset = 0
        self.global_arrays: Arrays | None = None
        self.initial_arrays: Arrays | None = None
        self.best: dict[str, Any] = {"metric": settings.best_metric, "value": None, "round": None}
        self.history: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "evaluate": {}, "server": {}}
        self.train_population = 0
        # The evaluate line of the current round: written at its end, with the server's own metrics.
        self.pending_evaluate: dict[str, Any] | None = None
        self.evaluate_config: ConfigRecord = ConfigRecord()
        self.num_rounds = settings.num_server_rounds
        # Called with (round, that round's metrics.jsonl records) after each round (console table).
        self.on_round_end: Callable[[int, list[dict[str, Any]]], None] | None = None
        # The object whose Strategy.start drives the rounds: this strategy, or a wrapper around it.
        self.driver: Any = self
        self._sent: Arrays = {}
        self._phase_start: dict[str, float] = {}
        self._evaluate_sent = 0
        self._withheld: list[tuple[Message, str]] = []

    # ------------------------------------------------------------------------------------
    # Hooks for the variants (each variant overrides one of these)
    # ------------------------------------------------------------------------------------
    def shared_keys(self, arrays: Mapping[str, np.ndarray]) -> list[str]:
        """Names of the arrays that travel and are aggregated (all of them; FedBN keeps some local)."""
        return list(arrays)

    def round_train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """Per-round train settings sent to the sites (FedProx adds ``proximal-mu``)."""
        return config

    def train_content(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        """The RecordDict sent to each sampled site (SCAFFOLD adds its control variate)."""
        return RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})

    def check_extra(self, content: RecordDict) -> str | None:
        """Extra per-reply validation (SCAFFOLD checks ``scaffold-delta-c``); reason or None."""
        return None

    def aggregate_arrays(self, server_round: int, current: Arrays, updates: list[SiteUpdate]) -> Arrays:
        """New shared arrays from the accepted updates (sorted by site): case-weighted mean."""
        mean = weighted_mean([u.arrays for u in updates], [u.weight for u in updates])
        return server_step(current, mean, self.settings.effective_server_lr)

    def server_state_arrays(self) -> dict[str, Arrays]:
        """Extra server-side arrays to checkpoint (optimizer moments, control variates)."""
        return {}

    def restore_server_state_arrays(self, arrays: Mapping[str, Arrays]) -> None:
        """Inverse of :meth:`server_state_arrays`."""

    def extra_state(self) -> dict[str, Any]:
        """JSON state of a variant (besides arrays)."""
        return {}

    def restore_extra_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""

    # ------------------------------------------------------------------------------------
    # Public interface for wrappers and cross-site evaluation
    # ------------------------------------------------------------------------------------
    @property
    def sent_arrays(self) -> Arrays:
        """The shared arrays of this round that replies carry back and are checked against
        (all that is sent for training but the frozen ones)."""
        return self._sent

    @property
    def excluded_from_sampling(self) -> dict[str, str]:
        """Sites never sampled for training again, with the reason (e.g. an exhausted budget)."""
        return self.screener.excluded_from_sampling

    def site_of(self, msg: Message) -> str:
        """The site name of a reply (see :class:`~strategies.screening.ReplyScreener`)."""
        return self.screener.site_of(msg)

    def absolute_round(self, local_round: int) -> int:
        """Flower's round number (counted from 1 in every ``start``) -> the run's round number."""
        return local_round + self.round_offset

    def withhold(self, msgs: Iterable[Message], reason: str) -> None:
        """Replies a wrapper keeps from aggregation: the next ``aggregate_train`` screens them and
        excludes those that pass screening with ``reason``."""
        self._withheld = [(m, reason) for m in msgs]

    # ------------------------------------------------------------------------------------
    # Flower Strategy interface
    # ------------------------------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> fedimaging strategy '%s'", self.settings.strategy)
        log(INFO, "\t│\t├── seed %d | run dir %s", self.settings.seed, self.run_dir.root)
        if self.local_param_names:
            log(INFO, "\t│\t├── site-local parameters: %d", len(self.local_param_names))
        if self.frozen_param_names:
            log(INFO, "\t│\t├── frozen parameters (sent, never returned): %d", len(self.frozen_param_names))
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.absolute_round(server_round)
        self._phase_start["train"] = time.monotonic()
        self.global_arrays = to_numpy(arrays)
        shared = {k: self.global_arrays[k] for k in self.shared_keys(self.global_arrays)}
        self._sent = {k: v for k, v in shared.items() if k not in self.frozen_param_names}
        node_ids, self.train_population = self.sampler.sample(
            grid, self.fraction_train, self.min_train_nodes, self.min_available_nodes,
            self.screener.node_sites, self.screener.excluded_from_sampling)
        if not node_ids:
            log(WARNING, "configure_train: no site can be sampled for training in round %d", rnd)
            return []
        cfg = ConfigRecord(dict(config))
        cfg["local-epochs"] = self.settings.local_epochs
        cfg["lr"] = self.settings.round_lr(rnd)
        cfg["server-round"] = rnd
        cfg = self.round_train_config(rnd, cfg)
        record = self.train_content(rnd, to_record(shared), cfg)
        self.screener.awaiting["train"] = list(node_ids)
        log(INFO, "configure_train: round %d, %d site(s) sampled", rnd, len(node_ids))
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.absolute_round(server_round)
        withheld, self._withheld = self._withheld, []
        replies = list(replies) + [m for m, _ in withheld]
        screened = self.screener.screen_train(replies, self._sent, self.arrayrecord_key,
                                              dp_required=self.settings.dp_required, check_extra=self.check_extra)
        reasons = {int(m.metadata.src_node_id): reason for m, reason in withheld}
        for update in list(screened.accepted):
            reason = reasons.get(update.node_id) or next(
                (r for ext in self.extensions if (r := ext.check_update(self._sent, update))), None)
            if reason:
                screened.accepted.remove(update)
                screened.excluded[update.site] = reason
        self.screener.note_missing("train", replies, screened)
        s = self.settings
        clipped, norms = apply_norm_bound(screened, self._sent, max_update_norm=s.max_update_norm,
                                          relative_update_norm=s.relative_update_norm, action=s.update_norm_action)
        current = self.global_arrays or {}
        arrays_out: ArrayRecord | None = None
        if screened.accepted:
            shared = {k: current[k] for k in self._sent}
            new_shared = next((a for ext in self.extensions
                               if (a := ext.aggregate(rnd, shared, screened.accepted)) is not None), None)
            if new_shared is None:
                new_shared = self.aggregate_arrays(rnd, shared, screened.accepted)
            self.global_arrays = {k: new_shared.get(k, v) for k, v in current.items()}
            arrays_out = to_record(self.global_arrays)
        else:
            log(WARNING, "aggregate_train: round %d: no update accepted; global model unchanged", rnd)
        aggregate = weighted_site_mean({u.site: screened.sites[u.site] for u in screened.accepted})
        aggregate.update(received_model_mean({u.site: screened.sites[u.site] for u in screened.accepted}))
        for site, norm in norms.items():
            screened.sites.setdefault(site, {})["update-norm"] = norm
        for site, reason in screened.excluded.items():
            log(WARNING, "aggregate_train: round %d: excluded %s: %s", rnd, site, reason)
        line: dict[str, Any] = {
            "round": rnd,
            "phase": "train",
            "seconds": round(time.monotonic() - self._phase_start.get("train", time.monotonic()), 3),
            "sites": screened.sites,
            "aggregate": aggregate,
            "excluded": screened.excluded,
        }
        if clipped:
            line["clipped"] = clipped
        if any(k.startswith("received-") for m in screened.sites.values() for k in m):
            line["received-model"] = f"received-* are test metrics of the global model after round {rnd - 1}"
        for ext in self.extensions:
            line.update(ext.train_line(rnd, arrays_out is not None))
        self.run_dir.append_metrics(line)
        self.history["train"][rnd] = aggregate
        return arrays_out, (MetricRecord(aggregate) if aggregate else None)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.absolute_round(server_round)
        self._phase_start["evaluate"] = time.monotonic()
        self.pending_evaluate = None
        self.global_arrays = to_numpy(arrays)
        every = self.settings.evaluate_every
        if rnd < self.num_rounds and (every == 0 or rnd % every):
            self._evaluate_sent = 0  # evaluate-every: no evaluate messages (no site process) this round
            return []
        node_ids, _ = self.sampler.sample(grid, self.fraction_evaluate, self.min_evaluate_nodes,
                                          self.min_available_nodes, self.screener.node_sites)
        self._evaluate_sent = len(node_ids)
        self.screener.awaiting["evaluate"] = list(node_ids)
        if not node_ids:
            return []
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = rnd
        shared = {k: self.global_arrays[k] for k in self.shared_keys(self.global_arrays)}
        record = RecordDict({self.arrayrecord_key: to_record(shared), self.configrecord_key: cfg})
        return self._construct_messages(record, node_ids, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = self.absolute_round(server_round)
        replies = list(replies)
        if not replies and not self._evaluate_sent:
            return None
        screened = self.screener.screen_evaluate(replies)
        self.screener.note_missing("evaluate", replies, screened)
        aggregate = weighted_site_mean({u.site: screened.sites[u.site] for u in screened.accepted})
        for site, reason in screened.excluded.items():
            log(WARNING, "aggregate_evaluate: round %d: excluded %s: %s", rnd, site, reason)
        self.pending_evaluate = {
            "round": rnd,
            "phase": "evaluate",
            "seconds": round(time.monotonic() - self._phase_start.get("evaluate", time.monotonic()), 3),
            "sites": screened.sites,
            "aggregate": aggregate,
            "excluded": screened.excluded,
        }
        self.history["evaluate"][rnd] = aggregate
        return MetricRecord(aggregate) if aggregate else None

    # ------------------------------------------------------------------------------------
    # The one call for the ServerApp, and the server state (see run_loop / server_state)
    # ------------------------------------------------------------------------------------
    def run(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        resume_from: str | Path | None = None,
    ) -> Result:
        """Run (or resume) the whole federation and write the final outputs (``run_loop.run``)."""
        return run_loop.run(self, grid, initial_arrays, num_rounds=num_rounds, train_config=train_config,
                            evaluate_config=evaluate_config, evaluate_fn=evaluate_fn, resume_from=resume_from)

    def save_server_state(self, rnd: int) -> None:
        """Everything needed to continue after round ``rnd``."""
        server_state.save(self, rnd)

    def restore_server_state(self, root: str | Path) -> int:
        """Load the state saved in run directory ``root``; returns the last completed round."""
        return server_state.restore(self, root)
