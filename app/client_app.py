"""ClientApp: translates Flower messages into task calls at one site. Nothing else.

What leaves the site is chosen here, by parameter name: the model's shared arrays, numeric
metrics, the site's public name and, for SCAFFOLD, the change of its control variate. No
file path, case name or image value is ever put into a reply; dataset errors are logged in
full at the site and reported to the server only as a reason code (``app.site_failures``):
every train and evaluate call is wrapped by :func:`_reported_as_code`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from app.preflight import sendable_channel_names
from app.config import RunConfig, SiteConfig, parse_run_config, parse_site_config
from app import site_he
from app.site_failures import SiteDataError, failure_code, refusal_reason
from app.site_mods import site_clipping_mod
from app.site_personal import personal_metrics, train_personal
from app.site_state import SiteStateStore
from data_prep.demo import UNSEEN_SITE, ensure_demo_site
from data_prep.site_dataset import DatasetError, SiteDataset, load_site_dataset
from privacy import DPSettings, DPSiteSession, LedgerError, case_units, study_share
from tasks import LocalTrainingOptions, SiteDataCache, Task, device, get_task, make_optimizer

log = logging.getLogger("fedimaging.site")
app = ClientApp()


def _site_console() -> None:
    """Site progress and failures on the SuperNode's console: Flower configures only its own logger."""
    package = logging.getLogger("fedimaging")
    if not logging.getLogger().handlers and not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


_site_console()

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


def _configure_threads(run: RunConfig) -> None:
    threads = run.torch_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or (os.cpu_count() or 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _runtime(context: Context) -> SiteRuntime:
    run = parse_run_config(context.run_config)
    site = parse_site_config(context.node_config, run)
    _configure_threads(run)
    settings = run.task_settings()
    if site.dp_epsilon > 0:  # a site may turn DP on by itself (node config)
        settings = dataclasses.replace(settings, crops_per_case=1, dp_compatible=True)
    key = (run.task, settings)
    if key not in _TASKS:
        _TASKS[key] = get_task(run.task, settings)
    return SiteRuntime(run, site, _TASKS[key])


def _dataset(rt: SiteRuntime, which: str = "own") -> SiteDataset:
    """The site's dataset (or, in simulation, the demo's evaluation-only unseen site)."""
    try:
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


def _site_data(rt: SiteRuntime, dataset: SiteDataset) -> Any:
    return _SITE_DATA.get((str(dataset.root), rt.run.task, rt.task.settings), lambda: rt.task.prepare_site(dataset))


def _round_seed(run: RunConfig, site: str, server_round: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{run.seed}:{site}:{server_round}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _load_global(model: torch.nn.Module, arrays: ArrayRecord, local: dict[str, torch.Tensor] | None) -> None:
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


def _site_record(rt: SiteRuntime, **extra: str) -> ConfigRecord:
    return ConfigRecord({"site-name": rt.site.site_name, **extra})


def _reported_as_code(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Any failure: the full traceback in the site's log, only a reason code in the reply."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:  # noqa: BLE001 - every failure, whatever raised it
            code = failure_code(exc)
            log.exception("%s failed at this site (reported to the server only as '%s')",
                          msg.metadata.message_type, code)
            try:
                site = _site_record(_runtime(context), **{"refused-reason": refusal_reason(code)})
            except Exception:  # noqa: BLE001 - the site's own config is what failed
                site = ConfigRecord({"refused-reason": refusal_reason(code)})
            content = RecordDict({"metrics": MetricRecord({"num-examples": 0, "refused": 1}), "site": site})
            return Message(content=content, reply_to=msg)

    return guarded


@app.train(mods=[site_clipping_mod])
@_reported_as_code
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the site's own cases."""
    rt = _runtime(context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    run_key = str(config.get("run-key", f"run-{context.run_id}"))
    store = SiteStateStore(rt.site.state_dir, run_key)
    baseline = bool(config.get("local-baseline", False))
    dataset = _dataset(rt)
    site_data = _site_data(rt, dataset)

    if baseline and rt.site.dp_epsilon > 0:
        # A local-only model trained without DP-SGD would leak what the site's budget protects.
        return Message(content=_refusal(rt, "local baselines are not trained at a DP site"), reply_to=msg)
    shared = msg.content["arrays"]
    epochs = int(config["local-epochs"])
    session = None
    if rt.site.dp_epsilon > 0 and not baseline:
        try:
            study_epsilon = float(config.get("dp-study-epsilon", rt.run.dp_study_epsilon))
            study_share(study_epsilon, rt.site.dp_epsilon)
        except (TypeError, ValueError):
            return Message(content=_refusal(rt, "privacy-bad-study-epsilon"), reply_to=msg)
        try:
            session = _dp_session(rt, dataset, site_data, run_key, server_round, epochs, study_epsilon)
        except LedgerError as exc:  # the budget spent is unknown: never train, never send the path
            log.error("Refusing to train: %s", exc)
            return Message(content=_refusal(rt, "privacy-ledger-error"), reply_to=msg)
        model = session.module
    else:
        model = rt.task.build_model()
    local_names = set(model.state_dict()) - set(shared.keys())
    local_state = None if baseline or not local_names else store.load_before("fedbn", server_round)
    _load_global(model, shared, local_state)
    personalize = rt.run.personalization != "none" and not baseline and session is None
    received = {k: v.detach().clone() for k, v in model.state_dict().items()} if personalize else None
    if session is not None:
        try:
            refusal = session.begin_round(epochs)
        except LedgerError as exc:
            log.error("Refusing to train: %s", exc)
            return Message(content=_refusal(rt, "privacy-ledger-error"), reply_to=msg)
        if refusal is not None:  # a reason code (privacy.REFUSAL_CODES); the numbers stay in the log
            log.warning("Refusing to train (%s): %s", refusal, session.refusal_detail)
            return Message(content=_refusal(rt, refusal, session), reply_to=msg)

    options = LocalTrainingOptions(
        epochs=epochs,
        dp=session,
        lr=float(config["lr"]),  # the server's schedule decides each round's learning rate
        seed=_round_seed(rt.run, rt.site.site_name, server_round, "baseline" if baseline else "train"),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    if session is not None:  # the session's optimizer lives across rounds: give it this round's lr
        for group in session.optimizer.original_optimizer.param_groups:
            group["lr"] = options.lr
    if "scaffold-c" in msg.content and not baseline:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        server_c = {k: v for k, v in msg.content["scaffold-c"].to_torch_state_dict().items() if k in trainable}
        options.scaffold_server = server_c
        options.scaffold_site = store.load_before("scaffold", server_round)

    try:
        result = rt.task.train(model, site_data, options)
    except BaseException:
        if session is not None:
            session.end_round()  # settle the steps actually taken; the next round can begin
        raise
    if session is not None:
        result.extra.update(session.end_round())
    state = model.state_dict()
    if local_names and not baseline:
        store.save("fedbn", server_round, {k: state[k] for k in local_names})
    if personalize:  # after the global update, which it never changes; the personal model stays here
        train_personal(rt.run, rt.task, store, server_round, received, site_data, options.lr,
                       _round_seed(rt.run, rt.site.site_name, server_round, "personal"))
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: state[k] for k in shared.keys()}),
            "metrics": MetricRecord(
                {"num-examples": result.num_examples, "loss": result.loss, "train-steps": result.steps,
                 "train-seconds": result.seconds, **result.extra}
            ),
            "site": _site_record(rt),
        }
    )
    if rt.run.secure_aggregation == "he" and not baseline:  # the update leaves only encrypted
        del reply["arrays"]
        reply["he"] = site_he.train_record(rt.run, rt.site, run_key, shared, state, result.num_examples,
                                           server_round)
    if result.scaffold_delta is not None:
        site_c = options.scaffold_site or {k: torch.zeros_like(v) for k, v in result.scaffold_delta.items()}
        store.save("scaffold", server_round, {k: site_c[k] + result.scaffold_delta[k] for k in result.scaffold_delta})
        reply["scaffold-delta-c"] = ArrayRecord(result.scaffold_delta)
    return Message(content=reply, reply_to=msg)


def _dp_session(rt: SiteRuntime, dataset: SiteDataset, site_data: Any, run_key: str, server_round: int,
                epochs: int, study_epsilon: float) -> DPSiteSession:
    """The site's DP-SGD session for this run (created once; the ledger lives in state-dir)."""
    # Keyed by where the ledger lives too: two runs in one process with equal run-dir names but
    # different sites' state (benchmarks, tests) must not share a session and its spent budget.
    key = (run_key, rt.site.site_name, str(rt.site.state_dir), str(dataset.root))
    if key not in _DP_SESSIONS:
        node = {"dp-epsilon": rt.site.dp_epsilon, "dp-max-grad-norm": rt.site.dp_max_grad_norm}
        if rt.site.dp_delta > 0:
            node["dp-delta"] = rt.site.dp_delta
        try:
            settings = DPSettings.from_node_config(node, len(dataset.training))
        except ValueError as exc:
            raise SiteDataError(f"site DP settings: {exc}", "site-config-invalid") from None
        model = rt.task.build_model().to(device())
        optimizer = make_optimizer(rt.task.settings.optimizer, model.parameters(), rt.run.lr)
        _DP_SESSIONS[key] = DPSiteSession(
            model=model, optimizer=optimizer, train_loader=rt.task.dp_loader(site_data), settings=settings,
            state_dir=rt.site.state_dir, cases=case_units(dataset.root, [c.name for c in dataset.training]),
            data_path=dataset.root, run_id=run_key, study_epsilon=study_epsilon,
            rounds=max(1, rt.run.num_server_rounds - server_round + 1), local_epochs=epochs,
            seed=_round_seed(rt.run, rt.site.site_name, server_round, "dp"),
        )
    return _DP_SESSIONS[key]


def _refusal(rt: SiteRuntime, reason: str, session: DPSiteSession | None = None) -> RecordDict:
    """A reply without model arrays: the site declines this round and says why (no data inside)."""
    metrics = {"num-examples": 0, "refused": 1}
    if session is not None:
        metrics["dp-epsilon-spent"] = float(session.spent())
    return RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(rt, **{"refused-reason": reason})})


@app.query("he_public")
@_reported_as_code
def he_public(msg: Message, context: Context) -> Message:
    """secure-aggregation=he: the study's public CKKS context (never the secret key)."""
    rt = _runtime(context)
    reply = site_he.public_reply(rt.run, rt.site, msg.content["config"], f"run-{context.run_id}")
    reply["site"] = _site_record(rt)
    return Message(content=reply, reply_to=msg)


@app.query("he_decrypt")
@_reported_as_code
def he_decrypt(msg: Message, context: Context) -> Message:
    """secure-aggregation=he: decrypt the coordinator's ciphertext sum of a round this site trained in."""
    rt = _runtime(context)
    reply = site_he.decrypt_reply(rt.run, rt.site, msg.content["he"], f"run-{context.run_id}")
    reply["site"] = _site_record(rt)
    return Message(content=reply, reply_to=msg)


@app.query()
@_reported_as_code
def query(msg: Message, context: Context) -> Message:
    """Before round 1: the site's image channel names and count (no path, no case data)."""
    rt = _runtime(context)
    dataset = _dataset(rt)
    names = sendable_channel_names(list(dataset.channel_names or (dataset.modality,)))
    reply = RecordDict({"site": _site_record(rt, **{"channel-names": names}),
                        "metrics": MetricRecord({"num-channels": len(names)})})
    return Message(content=reply, reply_to=msg)


@app.evaluate()
@_reported_as_code
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the received model on the site's test cases (or the demo's unseen site)."""
    rt = _runtime(context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    which = "unseen" if str(config.get("eval-dataset", "")) == "unseen" else "own"
    dataset = _dataset(rt, which)
    site_data = _site_data(rt, dataset)
    model = rt.task.build_model()
    shared = msg.content["arrays"]
    local_names = set(model.state_dict()) - set(shared.keys())
    run_key = str(config.get("run-key", f"run-{context.run_id}"))
    # FedBN: a site evaluates with its own normalisation layers (latest saved).
    local_state = SiteStateStore(rt.site.state_dir, run_key).load_before("fedbn", server_round + 1) if local_names else None
    _load_global(model, shared, local_state)
    metrics = rt.task.evaluate(model, site_data, "test")
    clean = {k: float(v) for k, v in metrics.items() if k != "num-examples"}
    if rt.run.personalization != "none" and which == "own" and bool(config.get("personal-metrics", True)):
        clean.update(personal_metrics(rt.task, SiteStateStore(rt.site.state_dir, run_key), server_round, site_data))
    reply = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": int(metrics.get("num-examples", 0)), **clean}),
            "site": _site_record(rt, **({"eval-dataset": "unseen"} if which == "unseen" else {})),
        }
    )
    return Message(content=reply, reply_to=msg)
