"""Reply screening: every reply is accepted or excluded with a reason, one by one.

Flower's own consistency check raises on one bad reply and kills the round; here a bad reply
(error reply, refusal, missing or extra keys, wrong shapes/dtypes, non-finite values, an update
above the norm bound) is excluded with a reason that ends up in ``metrics.jsonl``, and the
round goes on. The checks themselves are pure functions in :mod:`strategies.validation`; this
module applies them and remembers who is who (node id -> site name).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING
from typing import Any

from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore import log

from . import validation
from .aggregation import clip_update
from .metrics import WEIGHT_KEY, to_plain
from .records import Arrays, ScreenResult, SiteUpdate, to_numpy


def metrics_of(content: RecordDict) -> MetricRecord | None:
    """The reply's ``metrics`` record (or its only MetricRecord)."""
    if "metrics" in content.metric_records:
        return content.metric_records["metrics"]
    records = list(content.metric_records.values())
    return records[0] if len(records) == 1 else None


class ReplyScreener:
    """Screens one phase's replies; keeps the node -> site names and the sites never sampled again."""

    def __init__(self) -> None:
        self.node_sites: dict[int, str] = {}
        self.excluded_from_sampling: dict[str, str] = {}
        self.awaiting: dict[str, list[int]] = {}
        self._transport_errors: list[str] = []

    def site_of(self, msg: Message) -> str:
        """The site name a reply carries (remembered per node), else ``node-<id>``."""
        node = int(msg.metadata.src_node_id)
        if msg.has_content() and "site" in msg.content.config_records:
            name = msg.content.config_records["site"].get("site-name")
            if isinstance(name, str) and name.strip():
                self.node_sites[node] = name.strip()
        return self.node_sites.get(node, f"node-{node}")

    def note_missing(self, phase: str, replies: list[Message], screened: ScreenResult) -> None:
        """Sampled sites that sent nothing back before the round timeout."""
        answered = {int(m.metadata.src_node_id) for m in replies if not m.has_error()}
        answered |= {int(m.metadata.src_node_id) for m in replies if m.has_error()} & set(self.awaiting.get(phase, []))
        detail = f" ({self._transport_errors[0]})" if self._transport_errors else ""
        for node in self.awaiting.pop(phase, []):
            if node not in answered:
                screened.excluded[self.node_sites.get(node, f"node-{node}")] = f"no reply before the round timeout{detail}"
        self._transport_errors = []

    def _screen_common(self, msgs: list[Message], screened: ScreenResult) -> list[tuple[str, Message, Any]]:
        """Errors, refusals, metrics and case counts; returns (site, msg, metrics) still in play."""
        seen: set[str] = set()
        ordered = sorted(msgs, key=lambda m: (self.site_of(m), int(m.metadata.src_node_id)))
        remaining = []
        for msg in ordered:
            site = self.site_of(msg)
            if site in seen:  # two nodes claiming one name: keep both, apart
                site = f"{site}@node-{msg.metadata.src_node_id}"
            seen.add(site)
            if msg.has_error():
                reason = validation.short(f"error reply (code {msg.error.code}): {msg.error.reason}")
                awaited = {n for nodes in self.awaiting.values() for n in nodes}
                if awaited and int(msg.metadata.src_node_id) not in awaited:
                    # Sent by Flower itself (e.g. "node unavailable"), not by a site: it explains
                    # a missing reply, which note_missing attributes to the site that was asked.
                    self._transport_errors.append(reason)
                    continue
                screened.excluded[site] = reason
                continue
            metrics = metrics_of(msg.content)
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

    def screen_train(self, msgs: list[Message], sent: Arrays, arrays_key: str, *, dp_required: bool,
                     check_extra: Callable[[RecordDict], str | None]) -> ScreenResult:
        """Accept or exclude each train reply against the arrays ``sent`` this round."""
        screened = ScreenResult()
        for site, msg, metrics in self._screen_common(msgs, screened):
            content = msg.content
            weight = float(metrics[WEIGHT_KEY])
            if weight <= 0:
                screened.excluded[site] = "reported 0 training cases"
                continue
            if arrays_key not in content.array_records:
                screened.excluded[site] = f"reply has no '{arrays_key}' ArrayRecord"
                continue
            if dp_required and not validation.has_dp_metadata(metrics):
                screened.excluded[site] = "no DP metadata (dp-required=true): the site must train with DP-SGD"
                continue
            arrays = to_numpy(content.array_records[arrays_key])
            reason = validation.check_arrays(sent, arrays) or check_extra(content)
            if reason:
                screened.excluded[site] = reason
                continue
            screened.accepted.append(SiteUpdate(site, int(msg.metadata.src_node_id), arrays, weight, content))
        return screened

    def screen_evaluate(self, msgs: list[Message]) -> ScreenResult:
        """Evaluate replies only need metrics with a case count."""
        screened = ScreenResult()
        for site, msg, metrics in self._screen_common(msgs, screened):
            node = int(msg.metadata.src_node_id)
            screened.accepted.append(SiteUpdate(site, node, {}, float(metrics[WEIGHT_KEY]), msg.content))
        return screened


def apply_norm_bound(screened: ScreenResult, sent: Arrays, *, max_update_norm: float, relative_update_norm: float,
                     action: str) -> tuple[dict[str, str], dict[str, float]]:
    """Reject or clip updates above the norm bound; returns (notes on clipped sites, norms)."""
    if not screened.accepted:
        return {}, {}
    norms = validation.compute_norms(sent, {u.site: u.arrays for u in screened.accepted})
    if max_update_norm <= 0 and relative_update_norm <= 0:
        return {}, norms
    over = validation.norm_bound_decisions(norms, max_update_norm=max_update_norm,
                                           relative_update_norm=relative_update_norm)
    clipped: dict[str, str] = {}
    kept = []
    for u in screened.accepted:
        if u.site not in over:
            kept.append(u)
            continue
        note = f"update norm {norms[u.site]:.4g} > bound {over[u.site]:.4g}"
        if action == "clip":
            u.arrays = clip_update(sent, u.arrays, over[u.site])
            clipped[u.site] = f"clipped: {note}"
            log(WARNING, "norm bound: %s %s", u.site, clipped[u.site])
            kept.append(u)
        else:
            screened.excluded[u.site] = f"rejected: {note}"
    screened.accepted = kept
    return clipped, norms
