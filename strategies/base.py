"""FedImagingFedAvg: Flower's FedAvg with fedimaging's round bookkeeping.

What it adds to ``flwr.serverapp.strategy.FedAvg`` (and every variant inherits):
- replies are screened one by one (``validation``): error replies, refusals, missing/extra keys,
  wrong shapes/dtypes, non-finite values, an optional update-norm bound. A bad reply is excluded
  with a reason in ``metrics.jsonl`` and the round goes on (Flower's own check raises instead);
- case-weighted aggregation by pure functions (``aggregation``), replies sorted by site name so
  the result does not depend on arrival order, dtypes preserved;
- deterministic node sampling from the run seed (own ``random.Random``, saved with the state);
- ``metrics.jsonl`` lines, ``checkpoints/last.pt``/``best.pt``, ``final_model.pt`` and the
  server state for resume, written at the end of every round by the evaluate hook that
  ``Strategy.start`` calls (the loop itself is Flower's, DESIGN 4);
- ``run()``: one call for the ServerApp (resume, Flower's loop, final outputs, cross-site eval).

Variants override one hook: ``round_train_config`` (FedProx), ``aggregate_arrays`` (FedAdam,
FedYogi, FedMedian, FedTrimmedAvg), ``shared_keys`` (FedBN); SCAFFOLD also adds its variate to
the train message and checks the reply's ``scaffold-delta-c``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log

from . import validation
from .aggregation import (
    Arrays,
    clip_update,
    fixed_denominator_mean,
    server_step,
    update_norm,
    weighted_mean,
)
from .central_dp import epsilon_spent, new_noise_secret
from .metrics import WEIGHT_KEY, received_model_mean, to_plain, weighted_site_mean
from .run_dir import RunDirectory, load_server_state
from .settings import StrategySettings

EvaluateFn = Callable[[int, ArrayRecord], "MetricRecord | None"]
STATE_VERSION = 1


@dataclass
class SiteUpdate:
    """One accepted train reply: who sent it, its arrays, its weight (cases) and the full content."""

    site: str
    node_id: int
    arrays: Arrays
    weight: float
    content: RecordDict


@dataclass
class ScreenResult:
    """Outcome of screening one phase's replies."""

    accepted: list[SiteUpdate] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


def to_numpy(record: ArrayRecord) -> Arrays:
    """ArrayRecord -> dict of numpy arrays (order kept)."""
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """dict of numpy arrays -> ArrayRecord (order kept)."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


class FedImagingFedAvg(FedAvg):
    """Case-weighted FedAvg with validation, metrics log, checkpoints and resume (see module doc)."""

    def __init__(
        self,
        settings: StrategySettings,
        run_dir: RunDirectory,
        local_param_names: frozenset[str] = frozenset(),
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
        self.rng = random.Random(settings.seed)
        self.round_offset = 0
        self.node_sites: dict[int, str] = {}
        self.excluded_from_sampling: dict[str, str] = {}
        self.global_arrays: Arrays | None = None
        self.initial_arrays: Arrays | None = None
        self.best: dict[str, Any] = {"metric": settings.best_metric, "value": None, "round": None}
        self.history: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "evaluate": {}, "server": {}}
        self._sent: Arrays = {}
        self._phase_start: dict[str, float] = {}
        self._awaiting: dict[str, list[int]] = {}
        self._transport_errors: list[str] = []
        self._train_population = 0
        self._evaluate_sent = 0
        self._pending_evaluate: dict[str, Any] | None = None
        self._user_evaluate_fn: EvaluateFn | None = None
        self._grid: Grid | None = None
        self._evaluate_config: ConfigRecord = ConfigRecord()
        self._timeout = settings.round_timeout_s
        self.num_rounds = settings.num_rounds
        # Called with (round, that round's metrics.jsonl records) after each round (console table).
        self.on_round_end: Callable[[int, list[dict[str, Any]]], None] | None = None
        # The object whose Strategy.start drives the rounds: this strategy, or Flower's central DP
        # wrapper around it (strategies.central_dp; set by build_strategy).
        self.driver: Any = self
        self.central_dp_secret = new_noise_secret() if settings.central_dp != "off" else ""
        self.central_dp_releases = 0
        self._set_aside: list[Message] = []

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

    # ------------------------------------------------------------------------------------
    # Flower Strategy interface
    # ------------------------------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> fedimaging strategy '%s'", self.settings.name)
        log(INFO, "\t│\t├── seed %d | run dir %s", self.settings.seed, self.run_dir.root)
        if self.local_param_names:
            log(INFO, "\t│\t├── site-local parameters: %d", len(self.local_param_names))
        super().summary()

    @property
    def sent_arrays(self) -> Arrays:
        """The shared arrays sent for training this round (what replies are checked against)."""
        return self._sent

    def set_aside_replies(self, msgs: list[Message]) -> None:
        """Replies a wrapper kept from aggregation; the next ``aggregate_train`` screens them."""
        self._set_aside = list(msgs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self._round(server_round)
        self._phase_start["train"] = time.monotonic()
        self.global_arrays = to_numpy(arrays)
        self._sent = {k: self.global_arrays[k] for k in self.shared_keys(self.global_arrays)}
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes, train=True)
        if not node_ids:
            log(WARNING, "configure_train: no site can be sampled for training in round %d", rnd)
            return []
        cfg = ConfigRecord(dict(config))
        cfg.setdefault("local-epochs", self.settings.local_epochs)
        cfg.setdefault("lr", self.settings.lr)
        cfg["strategy"] = self.settings.name
        cfg["server-round"] = rnd
        cfg = self.round_train_config(rnd, cfg)
        record = self.train_content(rnd, to_record(self._sent), cfg)
        self._awaiting["train"] = list(node_ids)
        log(INFO, "configure_train: round %d, %d site(s) sampled", rnd, len(node_ids))
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self._round(server_round)
        aside = self._set_aside
        replies = list(replies) + aside
        self._set_aside = []
        screened = self.screen_train_replies(replies)
        if aside:  # set aside by the central-DP wrapper: unclipped, so never aggregated
            aside_nodes = {int(m.metadata.src_node_id) for m in aside}
            for update in [u for u in screened.accepted if u.node_id in aside_nodes]:
                screened.accepted.remove(update)
                screened.excluded[update.site] = "update could not be clipped for central DP"
        if self.settings.central_dp == "client-side":  # the sites clip: check that they did
            bound = self.settings.central_dp_clipping_norm * (1 + 1e-4)
            for update in list(screened.accepted):
                norm = update_norm(self._sent, update.arrays)
                if norm > bound:
                    screened.accepted.remove(update)
                    screened.excluded[update.site] = (
                        f"update norm {norm:.4g} exceeds central-dp-clipping-norm "
                        f"{self.settings.central_dp_clipping_norm:g}: the site did not clip")
        self._note_missing("train", replies, screened)
        clipped, norms = self._apply_norm_bound(screened)
        current = self.global_arrays or {}
        arrays_out: ArrayRecord | None = None
        if screened.accepted:
            shared = {k: current[k] for k in self._sent}
            if self.settings.central_dp != "off":
                # More sites than planned only lowers each one's weight (noise stays sufficient).
                n = max(self.settings.central_dp_denominator, len(screened.accepted))
                new_shared = fixed_denominator_mean(shared, [u.arrays for u in screened.accepted], n)
            else:
                new_shared = self.aggregate_arrays(rnd, shared, screened.accepted)
            self.global_arrays = {k: new_shared.get(k, v) for k, v in current.items()}
            arrays_out = to_record(self.global_arrays)
        else:
            log(WARNING, "aggregate_train: round %d: no update accepted; global model unchanged", rnd)
        aggregate = weighted_site_mean(
            {u.site: screened.sites[u.site] for u in screened.accepted}
        )
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
        if self.settings.central_dp != "off":
            line["central-dp"] = self._central_dp_release(arrays_out is not None)
        self.run_dir.append_metrics(line)
        self.history["train"][rnd] = aggregate
        return arrays_out, (MetricRecord(aggregate) if aggregate else None)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self._round(server_round)
        self._phase_start["evaluate"] = time.monotonic()
        self._pending_evaluate = None
        self.global_arrays = to_numpy(arrays)
        every = self.settings.evaluate_every
        if rnd < self.num_rounds and (every == 0 or rnd % every):
            self._evaluate_sent = 0  # evaluate-every: no evaluate messages (no site process) this round
            return []
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, train=False)
        self._evaluate_sent = len(node_ids)
        self._awaiting["evaluate"] = list(node_ids)
        if not node_ids:
            return []
        cfg = ConfigRecord(dict(config))
        cfg["server-round"] = rnd
        shared = {k: self.global_arrays[k] for k in self.shared_keys(self.global_arrays)}
        record = RecordDict({self.arrayrecord_key: to_record(shared), self.configrecord_key: cfg})
        return self._construct_messages(record, node_ids, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = self._round(server_round)
        replies = list(replies)
        if not replies and not self._evaluate_sent:
            return None
        screened = self.screen_evaluate_replies(replies)
        self._note_missing("evaluate", replies, screened)
        aggregate = weighted_site_mean({u.site: screened.sites[u.site] for u in screened.accepted})
        for site, reason in screened.excluded.items():
            log(WARNING, "aggregate_evaluate: round %d: excluded %s: %s", rnd, site, reason)
        self._pending_evaluate = {
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
    # Reply screening
    # ------------------------------------------------------------------------------------
    def _note_missing(self, phase: str, replies: list[Message], screened: ScreenResult) -> None:
        """Sampled sites that sent nothing back before the round timeout."""
        answered = {int(m.metadata.src_node_id) for m in replies if not m.has_error()}
        answered |= {int(m.metadata.src_node_id) for m in replies if m.has_error()} & set(self._awaiting.get(phase, []))
        detail = f" ({self._transport_errors[0]})" if self._transport_errors else ""
        for node in self._awaiting.pop(phase, []):
            if node not in answered:
                screened.excluded[self.node_sites.get(node, f"node-{node}")] = f"no reply before the round timeout{detail}"
        self._transport_errors = []

    def _site_of(self, msg: Message) -> str:
        node = int(msg.metadata.src_node_id)
        if msg.has_content() and "site" in msg.content.config_records:
            name = msg.content.config_records["site"].get("site-name")
            if isinstance(name, str) and name.strip():
                self.node_sites[node] = name.strip()
        return self.node_sites.get(node, f"node-{node}")

    @staticmethod
    def _metrics_of(content: RecordDict) -> MetricRecord | None:
        if "metrics" in content.metric_records:
            return content.metric_records["metrics"]
        records = list(content.metric_records.values())
        return records[0] if len(records) == 1 else None

    def _screen_common(self, msgs: list[Message], screened: ScreenResult) -> list[tuple[str, Message, Any]]:
        """Errors, refusals, metrics and case counts; returns (site, msg, metrics) still in play."""
        seen: set[str] = set()
        ordered = sorted(msgs, key=lambda m: (self._site_of(m), int(m.metadata.src_node_id)))
        remaining = []
        for msg in ordered:
            site = self._site_of(msg)
            if site in seen:  # two nodes claiming one name: keep both, apart
                site = f"{site}@node-{msg.metadata.src_node_id}"
            seen.add(site)
            if msg.has_error():
                reason = validation.short(f"error reply (code {msg.error.code}): {msg.error.reason}")
                awaited = {n for nodes in self._awaiting.values() for n in nodes}
                if awaited and int(msg.metadata.src_node_id) not in awaited:
                    # Sent by Flower itself (e.g. "node unavailable"), not by a site: it explains
                    # a missing reply, which _note_missing attributes to the site that was asked.
                    self._transport_errors.append(reason)
                    continue
                screened.excluded[site] = reason
                continue
            metrics = self._metrics_of(msg.content)
            if metrics is not None:
                screened.sites[site] = to_plain(metrics)
            if validation.is_refusal(metrics):
                site_cfg = msg.content.config_records.get("site")
                reason = str(site_cfg.get("refused-reason", "unspecified")) if site_cfg else "unspecified"
                screened.excluded[site] = validation.short(f"refused: {reason}")
                if validation.is_permanent_refusal(reason):
                    self.excluded_from_sampling[site] = validation.short(reason)
                continue
            reason = validation.check_num_examples(metrics)
            if reason:
                screened.excluded[site] = reason
                continue
            remaining.append((site, msg, metrics))
        return remaining

    def screen_train_replies(self, msgs: list[Message]) -> ScreenResult:
        """Accept or exclude each train reply against the arrays sent this round."""
        screened = ScreenResult()
        for site, msg, metrics in self._screen_common(msgs, screened):
            content = msg.content
            weight = float(metrics[WEIGHT_KEY])
            if weight <= 0:
                screened.excluded[site] = "reported 0 training cases"
                continue
            if self.arrayrecord_key not in content.array_records:
                screened.excluded[site] = f"reply has no '{self.arrayrecord_key}' ArrayRecord"
                continue
            if self.settings.dp_required and not validation.has_dp_metadata(metrics):
                screened.excluded[site] = "no DP metadata (dp-required=true): the site must train with DP-SGD"
                continue
            arrays = to_numpy(content.array_records[self.arrayrecord_key])
            reason = validation.check_arrays(self._sent, arrays) or self.check_extra(content)
            if reason:
                screened.excluded[site] = reason
                continue
            screened.accepted.append(SiteUpdate(site, int(msg.metadata.src_node_id), arrays, weight, content))
        return screened

    def screen_evaluate_replies(self, msgs: list[Message]) -> ScreenResult:
        """Evaluate replies only need metrics with a case count."""
        screened = ScreenResult()
        for site, msg, metrics in self._screen_common(msgs, screened):
            node = int(msg.metadata.src_node_id)
            screened.accepted.append(SiteUpdate(site, node, {}, float(metrics[WEIGHT_KEY]), msg.content))
        return screened

    def _apply_norm_bound(self, screened: ScreenResult) -> tuple[dict[str, str], dict[str, float]]:
        """Reject or clip updates above the norm bound; returns (notes on clipped sites, norms)."""
        s = self.settings
        if not screened.accepted:
            return {}, {}
        norms = validation.compute_norms(self._sent, {u.site: u.arrays for u in screened.accepted})
        if s.max_update_norm <= 0 and s.relative_update_norm <= 0:
            return {}, norms
        over = validation.norm_bound_decisions(
            norms, max_update_norm=s.max_update_norm, relative_update_norm=s.relative_update_norm
        )
        clipped: dict[str, str] = {}
        kept = []
        for u in screened.accepted:
            if u.site not in over:
                kept.append(u)
                continue
            note = f"update norm {norms[u.site]:.4g} > bound {over[u.site]:.4g}"
            if s.update_norm_action == "clip":
                u.arrays = clip_update(self._sent, u.arrays, over[u.site])
                clipped[u.site] = f"clipped: {note}"
                log(WARNING, "norm bound: %s %s", u.site, clipped[u.site])
                kept.append(u)
            else:
                screened.excluded[u.site] = f"rejected: {note}"
        screened.accepted = kept
        return clipped, norms

    # ------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, min_nodes: int, *, train: bool) -> list[int]:
        """Deterministic sampling with the strategy's own seeded RNG (Flower's uses global random)."""
        if fraction == 0.0:
            return []
        waited = 0
        while len(all_nodes := sorted(int(n) for n in grid.get_node_ids())) < self.min_available_nodes:
            if waited % 30 == 0:
                log(INFO, "Waiting for sites: %d connected, %d required", len(all_nodes), self.min_available_nodes)
            time.sleep(1)
            waited += 1
        # known sites by name (stable across restarts), nodes not heard from yet by id
        all_nodes.sort(key=lambda n: (n not in self.node_sites, self.node_sites.get(n, ""), n))
        eligible = all_nodes
        if train:
            eligible = [n for n in all_nodes if self.node_sites.get(n) not in self.excluded_from_sampling]
            self._train_population = len(eligible)
        if not eligible:
            return []
        size = min(len(eligible), max(int(len(eligible) * fraction), min_nodes))
        picked = set(self.rng.sample(eligible, size))
        return [n for n in eligible if n in picked]

    # ------------------------------------------------------------------------------------
    # End of round: evaluate hook, checkpoints, server state
    # ------------------------------------------------------------------------------------
    def _round(self, local_round: int) -> int:
        return local_round + self.round_offset

    def _end_of_round(self, local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by ``Strategy.start`` after each round (and once before the first)."""
        rnd = self._round(local_round)
        if local_round == 0:
            if self.round_offset or self._user_evaluate_fn is None:
                return None
            res = self._user_evaluate_fn(0, arrays)
            if res is not None:
                self.history["server"][0] = to_plain(res)
                self.run_dir.append_metrics({"round": 0, "phase": "evaluate", "seconds": 0.0, "sites": {},
                                             "aggregate": {}, "excluded": {}, "server": to_plain(res)})
            return res
        self.global_arrays = to_numpy(arrays)
        res = None
        if self._user_evaluate_fn is not None:
            t0 = time.monotonic()
            res = self._user_evaluate_fn(rnd, arrays)
            if res is not None:
                self.history["server"][rnd] = to_plain(res)
                if self._pending_evaluate is None:
                    self._pending_evaluate = {"round": rnd, "phase": "evaluate", "seconds": 0.0, "sites": {},
                                              "aggregate": {}, "excluded": {}}
                self._pending_evaluate["server"] = to_plain(res)
                self._pending_evaluate["seconds"] = round(
                    self._pending_evaluate["seconds"] + time.monotonic() - t0, 3)
        if self._pending_evaluate is not None:
            self.run_dir.append_metrics(self._pending_evaluate)
        self._update_checkpoints(rnd)
        self._pending_evaluate = None
        self.after_round(rnd)
        self.save_server_state(rnd)
        if self.on_round_end is not None:
            self.on_round_end(rnd, [r for r in self.run_dir.read_metrics() if int(r.get("round", -1)) == rnd])
        return res

    def after_round(self, server_round: int) -> None:
        """Extra end-of-round work (periodic cross-site evaluation); before the state is saved."""
        every = self.settings.cross_site_every
        if every and server_round % every == 0 and server_round < self.num_rounds and self._grid:
            # local import: cross_site imports base
            from .cross_site import run_cross_site

            run_cross_site(self, self._grid, final=False, server_round=server_round)

    def _best_candidate(self) -> float | None:
        metric = self.settings.best_metric
        pending = self._pending_evaluate or {}
        for source in (pending.get("aggregate") or {}, pending.get("server") or {}):
            value = source.get(metric)
            if isinstance(value, (int, float)) and np.isfinite(value):
                return float(value)
        return None

    def _update_checkpoints(self, rnd: int) -> None:
        assert self.global_arrays is not None
        self.run_dir.save_checkpoint("last", self.global_arrays)
        value = self._best_candidate()
        if value is None:
            return
        old = self.best.get("value")
        better = old is None or (value > old if self.settings.higher_is_better else value < old)
        if better:
            self.best = {"metric": self.settings.best_metric, "value": value, "round": rnd}
            self.run_dir.save_checkpoint("best", self.global_arrays)
            log(INFO, "New best %s=%.4f at round %d", self.settings.best_metric, value, rnd)

    def _central_dp_release(self, released: bool) -> dict[str, Any]:
        """Count a noisy release (Flower's wrapper adds the noise to what we return) and report."""
        s = self.settings
        if released:
            self.central_dp_releases += 1
        return {
            "mode": s.central_dp,
            "noise-multiplier": s.central_dp_noise_multiplier,
            "clipping-norm": s.central_dp_clipping_norm,
            "sites-denominator": s.central_dp_denominator,
            "noise-std": s.central_dp_noise_multiplier * s.central_dp_clipping_norm / s.central_dp_denominator,
            "releases": self.central_dp_releases,
            "delta": s.central_dp_delta,
            "epsilon": epsilon_spent(s.central_dp_noise_multiplier, self.central_dp_releases, s.central_dp_delta),
        }

    def extra_state(self) -> dict[str, Any]:
        """JSON state of a variant (besides arrays)."""
        return {}

    def restore_extra_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""

    def save_server_state(self, rnd: int) -> None:
        """Everything needed to continue after round ``rnd`` (arrays .pt, the rest JSON)."""
        assert self.global_arrays is not None
        arrays = {"global": self.global_arrays, **self.server_state_arrays()}
        version, internal, gauss = self.rng.getstate()
        state = {
            "version": STATE_VERSION,
            "strategy": self.settings.name,
            "settings": dataclasses.asdict(self.settings),
            "rng": {"version": version, "internal": list(internal), "gauss": gauss},
            "node_sites": {str(k): v for k, v in sorted(self.node_sites.items())},
            "excluded_from_sampling": dict(sorted(self.excluded_from_sampling.items())),
            "best": self.best,
            "history": {phase: {str(r): m for r, m in rows.items()} for phase, rows in self.history.items()},
            "extra": self.extra_state(),
            "central-dp": {"secret": self.central_dp_secret, "releases": self.central_dp_releases},
        }
        self.run_dir.save_server_state(rnd, arrays, state)

    def restore_server_state(self, root: str | Path) -> int:
        """Load the state saved in run directory ``root``; returns the last completed round."""
        loaded = load_server_state(root)
        if loaded is None:
            raise FileNotFoundError(
                f"resume-from={str(root)!r} has no server_state/latest.json; is it a fedimaging run directory?"
            )
        rnd, arrays, state = loaded
        if state.get("strategy") != self.settings.name:
            raise ValueError(
                f"resume-from={str(root)!r} was a '{state.get('strategy')}' run; "
                f"cannot continue it with strategy={self.settings.name!r}"
            )
        self.global_arrays = arrays["global"]
        if "initial" in arrays:
            self.initial_arrays = arrays["initial"]
        rng = state["rng"]
        self.rng.setstate((int(rng["version"]), tuple(int(x) for x in rng["internal"]), rng["gauss"]))
        self.node_sites = {int(k): str(v) for k, v in state.get("node_sites", {}).items()}
        self.excluded_from_sampling = dict(state.get("excluded_from_sampling", {}))
        self.best = dict(state.get("best", self.best))
        self.history = {
            phase: {int(r): m for r, m in rows.items()}
            for phase, rows in state.get("history", {}).items()
        }
        for phase in ("train", "evaluate", "server"):
            self.history.setdefault(phase, {})
        if "best-checkpoint" in arrays:  # the best model as of round rnd (see RunDirectory)
            self.run_dir.save_checkpoint("best", arrays["best-checkpoint"])
        self.run_dir.save_checkpoint("last", self.global_arrays)
        own = ("global", "initial", "best-checkpoint")
        self.restore_server_state_arrays({k: v for k, v in arrays.items() if k not in own})
        self.restore_extra_state(state.get("extra", {}))
        if self.settings.central_dp != "off":
            central = state.get("central-dp") or {}
            if not central.get("secret"):
                raise ValueError(f"resume-from={str(root)!r} was not a central-DP run; cannot add central DP now")
            self.central_dp_secret = str(central["secret"])
            self.central_dp_releases = int(central.get("releases", 0))
        self.round_offset = rnd
        return rnd

    # ------------------------------------------------------------------------------------
    # The one call for the ServerApp
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
        """Run (or resume) the whole federation and write the final outputs.

        Resume (``resume_from`` or ``settings.resume_from``: a run directory) restores the server
        state saved after round k and continues with round k+1 through Flower's
        ``Strategy.start``; ``metrics.jsonl`` keeps the lines of rounds <= k. A fresh run refuses
        a run directory that already holds server state.
        """
        num_rounds = self.settings.num_rounds if num_rounds is None else int(num_rounds)
        self.num_rounds = num_rounds
        resume_root = resume_from if resume_from is not None else (self.settings.resume_from or None)
        self._grid = grid
        self._user_evaluate_fn = evaluate_fn
        self._evaluate_config = ConfigRecord(dict(evaluate_config or {}))
        self.initial_arrays = to_numpy(initial_arrays)
        self._check_local_names(self.initial_arrays)
        log(INFO, "Run directory: %s", self.run_dir.root)
        done = 0
        if resume_root:
            done = self.restore_server_state(resume_root)
            self._check_resume_model(initial_arrays)
            previous = RunDirectory(Path(resume_root).expanduser().resolve())
            kept = [r for r in previous.read_metrics() if int(r.get("round", 0)) <= done]
            self.run_dir.replace_metrics(kept)
            self.run_dir.save_initial_model(self.initial_arrays)
            log(INFO, "Resuming from %s after round %d (of %d)", resume_root, done, num_rounds)
            start_arrays = to_record(self.global_arrays or {})
        else:
            if self.run_dir.load_server_state() is not None:
                raise ValueError(
                    f"run directory {self.run_dir.root} already holds a run; set resume-from to "
                    "continue it or choose another run-dir"
                )
            self.global_arrays = dict(self.initial_arrays)
            self.run_dir.save_initial_model(self.initial_arrays)
            start_arrays = initial_arrays
        remaining = num_rounds - done
        if remaining > 0:
            self.driver.start(
                grid=grid,
                initial_arrays=start_arrays,
                num_rounds=remaining,
                timeout=self._timeout,
                train_config=ConfigRecord(dict(train_config or {})),
                evaluate_config=self._evaluate_config,
                evaluate_fn=self._end_of_round,
            )
        else:
            log(INFO, "Nothing left to train: %d of %d rounds already done", done, num_rounds)
        self.finish()
        if self.settings.cross_site:
            from .cross_site import run_cross_site

            run_cross_site(self, grid, final=True, server_round=max(num_rounds, done))
        return self.result()

    def finish(self) -> None:
        """Final model and checkpoints (best.pt falls back to the final model if no metric came)."""
        assert self.global_arrays is not None
        self.run_dir.save_final_model(self.global_arrays)
        self.run_dir.save_checkpoint("last", self.global_arrays)
        if not (self.run_dir.checkpoints_dir / "best.pt").exists():
            log(WARNING, "No '%s' was reported; best.pt is the final model", self.settings.best_metric)
            self.run_dir.save_checkpoint("best", self.global_arrays)
        log(INFO, "Run directory: %s", self.run_dir.root)

    def result(self) -> Result:
        """Flower Result with absolute round numbers (including rounds before a resume)."""
        def records(rows: Mapping[int, Mapping[str, Any]]) -> dict[int, MetricRecord]:
            out = {}
            for rnd, metrics in sorted(rows.items()):
                clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                out[rnd] = MetricRecord(clean)
            return out

        return Result(
            arrays=to_record(self.global_arrays or {}),
            train_metrics_clientapp=records(self.history["train"]),
            evaluate_metrics_clientapp=records(self.history["evaluate"]),
            evaluate_metrics_serverapp=records(self.history["server"]),
        )

    # ------------------------------------------------------------------------------------
    def _check_local_names(self, arrays: Mapping[str, np.ndarray]) -> None:
        unknown = sorted(self.local_param_names - set(arrays))
        if unknown:
            raise ValueError(f"site-local parameter names not in the model: {unknown[:5]}")
        if self.settings.central_dp != "off":
            integer = sorted(k for k, v in arrays.items() if not np.issubdtype(np.asarray(v).dtype, np.floating))
            if integer:
                raise ValueError(
                    f"central-dp={self.settings.central_dp!r} clips and noises every array, but the model has "
                    f"non-float arrays {integer[:3]}: build it DP-compatible (no BatchNorm)"
                )

    def _check_resume_model(self, initial_arrays: ArrayRecord) -> None:
        assert self.global_arrays is not None
        given = {k: (tuple(v.shape), v.dtype) for k, v in initial_arrays.items()}
        saved = {k: (tuple(v.shape), str(v.dtype)) for k, v in self.global_arrays.items()}
        if given != saved:
            raise ValueError("resume-from: the saved global model does not match this run's model "
                             "(different task or architecture?)")
