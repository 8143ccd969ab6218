"""A site's runtime for one ClientApp message: settings, task, dataset, prepared data, DP session.

What lives for the life of a site process (prepared data, tasks, DP sessions) is kept here,
bounded; ``app.client_app`` only translates Flower messages into these calls and back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from app.config import RunConfig, parse_run_config
from app.site_config import SiteConfig, parse_site_config
from app.site_failures import SiteDataError
from data_prep.site_dataset import DatasetError, SiteDataset, load_site_dataset
from tasks import SiteDataCache, Task, cache as disk_cache, device, get_task, make_optimizer

if TYPE_CHECKING:  # privacy (Opacus) and the demo generator are imported where used: seconds per process
    from privacy import DPSiteSession

# Prepared site data and tasks live for the life of the site process (bounded, see SiteDataCache).
_SITE_DATA = SiteDataCache(max_sites=8)
_TASKS: dict[tuple, Task] = {}
# One DP-SGD session per (run, site, state, dataset) for the life of the process: never a new engine per round.
_DP_SESSIONS: dict[tuple[str, str, str, str], DPSiteSession] = {}


@dataclass
class SiteRuntime:
    run: RunConfig
    site: SiteConfig
    task: Task


def configure_threads(run: RunConfig) -> None:
    threads = run.torch_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def runtime(context: Context) -> SiteRuntime:
    run = parse_run_config(context.run_config)
    site = parse_site_config(context.node_config, run)
    configure_threads(run)
    settings = run.task_settings()
    if site.dp_epsilon > 0:  # a site may turn DP on by itself (node config)
        settings = dataclasses.replace(settings, crops_per_case=1, dp_compatible=True)
    key = (run.task, settings)
    if key not in _TASKS:
        _TASKS[key] = get_task(run.task, settings)
    return SiteRuntime(run, site, _TASKS[key])


def load_dataset(rt: SiteRuntime, which: str = "own") -> SiteDataset:
    """The site's dataset (or, in simulation, the demo's evaluation-only unseen site)."""
    try:
        if rt.site.is_demo or which == "unseen":
            from data_prep.demo import UNSEEN_SITE, ensure_demo_site  # simulation only
        if which == "unseen":
            if not rt.site.is_demo:
                raise SiteDataError("this site has no unseen evaluation dataset")
            path = ensure_demo_site(rt.run.demo_root_path, UNSEEN_SITE, rt.run.seed, rt.run.task, rt.run.demo_size)
        elif rt.site.is_demo:
            path = ensure_demo_site(rt.run.demo_root_path, rt.site.site_name, rt.run.seed, rt.run.task, rt.run.demo_size)
        else:
            path = rt.site.data_path
        return load_site_dataset(path, require_training=which != "unseen")
    except DatasetError as exc:
        raise SiteDataError(f"site dataset is not valid (fix it, e.g. re-run 'fedimaging prep'): {exc}") from exc


def prepared_data(rt: SiteRuntime, dataset: SiteDataset) -> Any:
    site = rt.site  # preprocessed cases persist under state-dir across processes (tasks.cache)
    return _SITE_DATA.get((str(dataset.root), rt.run.task, rt.task.settings), lambda: disk_cache.prepare(
        rt.task, dataset, disk_cache.site_cache(site.state_dir, dataset.root, site.disk_cache_mb)))


def round_seed(run: RunConfig, site: str, server_round: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{run.seed}:{site}:{server_round}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def load_global(model: torch.nn.Module, arrays: ArrayRecord, local: dict[str, torch.Tensor] | None) -> None:
    """Global arrays into the model; site-local (FedBN) layers from the site's own state."""
    state = arrays.to_torch_state_dict()
    if local:
        state.update(local)
    # strict=False: under FedBN the server never sends site-local layers; until the site has
    # saved its own (first round) they keep their initial values, identical at every site.
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise SiteDataError(f"server sent parameters this model does not have: {sorted(unexpected)[:5]}",
                            "message-invalid")


def site_record(rt: SiteRuntime, **extra: str) -> ConfigRecord:
    return ConfigRecord({"site-name": rt.site.site_name, **extra})


def evaluate_received(rt: SiteRuntime, shared: ArrayRecord, local: dict | None, site_data: Any) -> dict:
    """Test metrics of the received model before training (``received-*``): what the previous round's
    evaluate phase reports for this site, without its process. A copy is evaluated (DP model untouched)."""
    model = rt.task.build_model()
    load_global(model, shared, local)
    metrics = rt.task.evaluate(model, site_data, "test")
    return {f"received-{k}": int(v) if k == "num-examples" else float(v) for k, v in metrics.items()}


def dp_session(rt: SiteRuntime, dataset: SiteDataset, site_data: Any, run_key: str, server_round: int,
                epochs: int, study_epsilon: float) -> DPSiteSession:
    """The site's DP-SGD session for this run (created once; the ledger lives in state-dir)."""
    # Keyed by where the ledger lives too: two runs in one process with equal run-dir names but
    # different sites' state (benchmarks, tests) must not share a session and its spent budget.
    key = (run_key, rt.site.site_name, str(rt.site.state_dir), str(dataset.root))
    if key not in _DP_SESSIONS:
        from privacy import DPSettings, DPSiteSession, case_units  # Opacus: only DP sites need it

        node = {"dp-epsilon": rt.site.dp_epsilon, "dp-max-grad-norm": rt.site.dp_max_grad_norm}
        if rt.site.dp_delta > 0:
            node["dp-delta"] = rt.site.dp_delta
        try:
            settings = DPSettings.from_node_config(node, len(dataset.training))
        except ValueError as exc:
            raise SiteDataError(f"site DP settings: {exc}", "site-config-invalid") from None
        model = rt.task.build_model().to(device())
        # Opacus clips and noises only what trains: frozen parameters (run config freeze) are not its business
        optimizer = make_optimizer(rt.task.settings.optimizer, (p for p in model.parameters() if p.requires_grad),
                                   rt.run.lr)
        _DP_SESSIONS[key] = DPSiteSession(
            model=model, optimizer=optimizer, train_loader=rt.task.dp_loader(site_data), settings=settings,
            state_dir=rt.site.state_dir, cases=case_units(dataset.root, [c.name for c in dataset.training]),
            data_path=dataset.root, run_id=run_key, study_epsilon=study_epsilon,
            rounds=max(1, rt.run.num_server_rounds - server_round + 1), local_epochs=epochs,
            seed=round_seed(rt.run, rt.site.site_name, server_round, "dp"),
        )
    return _DP_SESSIONS[key]


def refusal_reply(rt: SiteRuntime, reason: str, session: DPSiteSession | None = None) -> RecordDict:
    """A reply without model arrays: the site declines this round and says why (no data inside)."""
    metrics = {"num-examples": 0, "refused": 1}
    if session is not None:
        metrics["dp-epsilon-spent"] = float(session.spent())
    return RecordDict({"metrics": MetricRecord(metrics), "site": site_record(rt, **{"refused-reason": reason})})
