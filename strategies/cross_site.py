"""Cross-site evaluation: every model evaluated at every site (NVIDIA FLARE's validation matrix).

Models: the global model, and with ``local-baselines`` one local-only model per site (trained from
the initial model on that site's data alone: train message with config ``local-baseline=True``
and ``local-epochs`` = the run's total epochs). With ``personalization``, one ``personal:<site>``
row per site: the ``personal-<metric>`` its evaluate reply gives beside the global model's, at
that site only, since a personal model never leaves its site. Columns: the sites, plus ``unseen`` when
``unseen-site`` is on (one node evaluates on the demo unseen site, config ``eval-dataset=unseen``).
The matrix maths (``summarise``) is a pure function. The strategy is used only through its
public interface: ``settings``, ``global_arrays``, ``initial_arrays``, ``num_rounds``,
``shared_keys``, ``site_of``, ``evaluate_config`` and ``run_dir``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedimaging.io import atomic_write_json

from . import validation
from .records import to_numpy, to_record
from .run_dir import json_safe

if TYPE_CHECKING:
    from .base import FedImagingFedAvg

UNSEEN = "unseen"


def summarise(models: Sequence[str], sites: Sequence[str], matrix: Sequence[Sequence[float | None]]) -> dict[str, Any]:
    """Means over the matrix: local models on their own site (diagonal) vs. on the other sites.

    ``global_mean`` is the global model's mean over the real sites; ``*_unseen`` the values on the
    unseen site. Missing entries (None) are skipped; a mean over nothing is None.
    """
    diag: list[float] = []
    off: list[float] = []
    local_unseen: list[float] = []
    personal: list[float] = []  # each personal model at its own site
    out: dict[str, Any] = {}
    real = [s for s in sites if s != UNSEEN]
    for model, row in zip(models, matrix):
        values = dict(zip(sites, row))
        if model.startswith("local:"):
            own = model.split(":", 1)[1]
            for site in real:
                v = values.get(site)
                if v is None:
                    continue
                (diag if site == own else off).append(float(v))
            if values.get(UNSEEN) is not None:
                local_unseen.append(float(values[UNSEEN]))
        elif model.startswith("personal:"):
            own = model.split(":", 1)[1]
            if values.get(own) is not None:
                personal.append(float(values[own]))
        elif model == "global":
            vals = [float(values[s]) for s in real if values.get(s) is not None]
            out["global_mean"] = _mean(vals)
            if UNSEEN in values:
                out["global_unseen"] = values[UNSEEN]
    out["mean_diagonal"] = _mean(diag)
    out["mean_off_diagonal"] = _mean(off)
    if local_unseen:
        out["local_unseen_mean"] = _mean(local_unseen)
    if personal:
        out["personal_mean"] = _mean(personal)
    return {"mean_diagonal": out.pop("mean_diagonal"), "mean_off_diagonal": out.pop("mean_off_diagonal"), **out}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def run_cross_site(strategy: FedImagingFedAvg, grid: Grid, *, final: bool, server_round: int) -> dict[str, Any]:
    """Run the cross-site evaluation and write ``cross_site.json`` (or ``cross_site/round-N.json``)."""
    s = strategy.settings
    assert strategy.global_arrays is not None
    metric = s.best_metric
    timeout = s.round_timeout_s
    nodes = sorted(int(n) for n in grid.get_node_ids())
    excluded: dict[str, str] = {}
    shared = strategy.shared_keys(strategy.global_arrays)
    models: dict[str, dict[str, np.ndarray]] = {"global": {k: strategy.global_arrays[k] for k in shared}}

    if final and s.local_baselines and strategy.initial_arrays is not None:
        initial = {k: strategy.initial_arrays[k] for k in shared}
        cfg = ConfigRecord({
            "server-round": server_round,
            "local-baseline": True,
            "local-epochs": int(s.local_epochs * max(strategy.num_rounds, 1)),
            "lr": float(s.round_lr(0)),
        })
        content = RecordDict({"arrays": to_record(initial), "config": cfg})
        msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        log(INFO, "cross-site: training %d local-only baseline(s)", len(msgs))
        for reply in sorted(grid.send_and_receive(msgs, timeout=timeout), key=lambda m: int(m.metadata.src_node_id)):
            site = strategy.site_of(reply)
            # frozen parameters (run config freeze) never come back: they are the initial ones
            returned = {k: v for k, v in initial.items() if k not in strategy.frozen_param_names}
            reason = _local_model_problem(reply, returned)
            if reason:
                excluded[f"local:{site}"] = reason
                continue
            models[f"local:{site}"] = {**initial, **to_numpy(reply.content.array_records["arrays"])}

    # every model at every site
    scores: dict[tuple[str, str], float | None] = {}
    site_names: set[str] = set()
    personal_rows: set[str] = set()
    for name in sorted(models, key=lambda m: (m != "global", m)):
        # Sites report their personal models' metrics only beside the global model's.
        cfg = ConfigRecord({**dict(strategy.evaluate_config), "server-round": server_round,
                            "personal-metrics": name == "global"})
        content = RecordDict({"arrays": to_record(models[name]), "config": cfg})
        msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        batches = [(False, msgs)]
        if s.unseen_site and nodes:  # separate batch: the unseen reply comes from a node also in msgs
            ucfg = ConfigRecord({**dict(cfg), "eval-dataset": UNSEEN})
            batches.append((True, [Message(content=RecordDict({"arrays": to_record(models[name]), "config": ucfg}),
                                           dst_node_id=nodes[0], message_type=MessageType.EVALUATE)]))
        for unseen, batch in batches:
            for reply in grid.send_and_receive(batch, timeout=timeout):
                site = UNSEEN if unseen else strategy.site_of(reply)
                site_names.add(site)
                value, reason = _metric_of(reply, metric)
                if reason:
                    excluded[f"{name}@{site}"] = reason
                scores[(name, site)] = value
                if name == "global" and not unseen:  # personal:<site>, at that site only (it never leaves)
                    personal, _ = _metric_of(reply, f"personal-{metric}")
                    if personal is not None:
                        personal_rows.add(f"personal:{site}")
                        scores[(f"personal:{site}", site)] = personal

    sites = sorted(n for n in site_names if n != UNSEEN) + ([UNSEEN] if s.unseen_site else [])
    model_names = sorted(models, key=lambda m: (m != "global", m)) + sorted(personal_rows)
    matrix = [[scores.get((m, site)) for site in sites] for m in model_names]
    result = {
        "metric": metric,
        "round": server_round,
        "models": model_names,
        "sites": sites,
        "matrix": matrix,
        "summary": summarise(model_names, sites, matrix),
        "excluded": excluded,
    }
    if final:
        strategy.run_dir.write_cross_site(result)
    else:
        atomic_write_json(strategy.run_dir.root / "cross_site" / f"round-{server_round:05d}.json", json_safe(result))
    for key, reason in excluded.items():
        log(WARNING, "cross-site: %s: %s", key, reason)
    return result


def _local_model_problem(reply: Message, initial: Mapping[str, np.ndarray]) -> str | None:
    if reply.has_error():
        return validation.short(f"error reply (code {reply.error.code}): {reply.error.reason}")
    metrics = reply.content.metric_records.get("metrics")
    if validation.is_refusal(metrics):
        site_cfg = reply.content.config_records.get("site")
        reason = site_cfg.get("refused-reason", "unspecified") if site_cfg else "unspecified"
        return validation.short(f"refused: {reason}")
    if "arrays" not in reply.content.array_records:
        return "reply has no 'arrays' ArrayRecord"
    return validation.check_arrays(initial, to_numpy(reply.content.array_records["arrays"]))


def _metric_of(reply: Message, metric: str) -> tuple[float | None, str | None]:
    if reply.has_error():
        return None, validation.short(f"error reply (code {reply.error.code}): {reply.error.reason}")
    metrics = reply.content.metric_records.get("metrics")
    if validation.is_refusal(metrics):
        site_cfg = reply.content.config_records.get("site")
        return None, validation.short(f"refused: {site_cfg.get('refused-reason', 'unspecified') if site_cfg else 'unspecified'}")
    if metrics is None or metric not in metrics:
        return None, f"no '{metric}' in the reply"
    value = metrics[metric]
    if isinstance(value, list) or not np.isfinite(float(value)):
        return None, f"'{metric}' is not a finite number"
    return float(value), None
