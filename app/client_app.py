"""ClientApp: translates Flower messages into task calls at one site. Nothing else.

What leaves the site is chosen here, by parameter name: the model's shared arrays (less those
run config ``freeze`` keeps fixed: the server keeps its own copy of them), numeric
metrics, the site's public name and, for SCAFFOLD, the change of its control variate. No
file path, case name or image value is ever put into a reply; dataset errors are logged in
full at the site and reported to the server only as a reason code (``app.site_failures``):
every train and evaluate call is wrapped by :func:`_reported_as_code`.
"""

from __future__ import annotations

from app import timings  # first: marks when the ClientApp's imports begin (FEDIMAGING_TIMINGS)

import functools
import logging
from collections.abc import Callable

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
from app import site_he
from app.site_failures import failure_code, refusal_reason
from app.site_mods import site_clipping_mod
from app.site_runtime import (
    dp_session,
    evaluate_received,
    load_dataset,
    load_global,
    prepared_data,
    refusal_reply,
    round_seed,
    runtime,
    site_record,
)
from app.site_personal import personal_metrics, train_personal
from app.site_state import SiteStateStore
from fedimaging.quiet import silence_library_notices
from tasks import LocalTrainingOptions

timings.imports_done()
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
silence_library_notices()  # the Flower simulation loads this module before it starts Ray

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
                site = site_record(runtime(context), **{"refused-reason": refusal_reason(code)})
            except Exception:  # noqa: BLE001 - the site's own config is what failed
                site = ConfigRecord({"refused-reason": refusal_reason(code)})
            content = RecordDict({"metrics": MetricRecord({"num-examples": 0, "refused": 1}), "site": site})
            return Message(content=content, reply_to=msg)

    return guarded


def _begin(msg: Message, context: Context, kind: str):
    """The message's config and round, its timing, and the site's runtime (timed as setup)."""
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    timing = timings.MessageTiming(kind, server_round)
    with timing.section("setup"):
        rt = runtime(context)
    return config, server_round, timing, rt


@app.train(mods=[site_clipping_mod])
@_reported_as_code
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the site's own cases."""
    config, server_round, timing, rt = _begin(msg, context, "train")
    run_key = str(config.get("run-key", f"run-{context.run_id}"))
    store = SiteStateStore(rt.site.state_dir, run_key)
    baseline = bool(config.get("local-baseline", False))
    with timing.section("data"):
        dataset = load_dataset(rt)
        site_data = prepared_data(rt, dataset)

    if baseline and rt.site.dp_epsilon > 0:
        # A local-only model trained without DP-SGD would leak what the site's budget protects.
        return Message(content=refusal_reply(rt, "local baselines are not trained at a DP site"), reply_to=msg)
    shared = msg.content["arrays"]
    epochs = int(config["local-epochs"])
    session = None
    if rt.site.dp_epsilon > 0 and not baseline:
        from privacy import LedgerError, study_share  # Opacus: only DP sites import it

        try:
            study_epsilon = float(config.get("dp-study-epsilon", rt.run.dp_study_epsilon))
            study_share(study_epsilon, rt.site.dp_epsilon)
        except (TypeError, ValueError):
            return Message(content=refusal_reply(rt, "privacy-bad-study-epsilon"), reply_to=msg)
        try:
            session = dp_session(rt, dataset, site_data, run_key, server_round, epochs, study_epsilon)
        except LedgerError as exc:  # the budget spent is unknown: never train, never send the path
            log.error("Refusing to train: %s", exc)
            return Message(content=refusal_reply(rt, "privacy-ledger-error"), reply_to=msg)
        model = session.module
    else:
        model = rt.task.build_model()
    local_names = set(model.state_dict()) - set(shared.keys())
    frozen = rt.task.frozen_names(model)  # run config freeze: fixed here, never sent back
    local_state = None if baseline or not local_names else store.load_before("fedbn", server_round)
    load_global(model, shared, local_state)
    personalize = rt.run.personalization != "none" and not baseline and session is None
    received_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if personalize else None
    if session is not None:
        try:
            refusal = session.begin_round(epochs)
        except LedgerError as exc:
            log.error("Refusing to train: %s", exc)
            return Message(content=refusal_reply(rt, "privacy-ledger-error"), reply_to=msg)
        if refusal is not None:  # a reason code (privacy.REFUSAL_CODES); the numbers stay in the log
            log.warning("Refusing to train (%s): %s", refusal, session.refusal_detail)
            return Message(content=refusal_reply(rt, refusal, session), reply_to=msg)

    received = {}
    if config.get("evaluate-received"):
        with timing.section("evaluate"):
            received = evaluate_received(rt, shared, local_state, site_data)
    options = LocalTrainingOptions(
        epochs=epochs,
        dp=session,
        lr=float(config["lr"]),  # the server's schedule decides each round's learning rate
        seed=round_seed(rt.run, rt.site.site_name, server_round, "baseline" if baseline else "train"),
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
        with timing.section("train"):
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
        train_personal(rt.run, rt.task, store, server_round, received_state, site_data, options.lr,
                       round_seed(rt.run, rt.site.site_name, server_round, "personal"))
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: state[k] for k in shared.keys() if k not in frozen}),
            "metrics": MetricRecord(
                {"num-examples": result.num_examples, "loss": result.loss, "train-steps": result.steps,
                 "train-seconds": result.seconds, **result.extra, **received}
            ),
            "site": site_record(rt),
        }
    )
    if rt.run.secure_aggregation == "he" and not baseline:  # the update leaves only encrypted
        del reply["arrays"]
        returned = ArrayRecord({k: shared[k] for k in shared.keys() if k not in frozen})
        reply["he"] = site_he.train_record(rt.run, rt.site, run_key, returned, state, result.num_examples,
                                           server_round)
    if result.scaffold_delta is not None:
        site_c = options.scaffold_site or {k: torch.zeros_like(v) for k, v in result.scaffold_delta.items()}
        store.save("scaffold", server_round, {k: site_c[k] + result.scaffold_delta[k] for k in result.scaffold_delta})
        reply["scaffold-delta-c"] = ArrayRecord(result.scaffold_delta)
    timing.emit()
    return Message(content=reply, reply_to=msg)


@app.query("he_public")
@app.query("he_decrypt")
@_reported_as_code
def he_query(msg: Message, context: Context) -> Message:
    """secure-aggregation=he: ``he_public``, the study's public CKKS context (never the secret key);
    ``he_decrypt``, the decryption of the coordinator's ciphertext sum of a round this site trained in."""
    rt = runtime(context)
    if msg.metadata.message_type.rpartition(".")[2] == "he_public":
        reply = site_he.public_reply(rt.run, rt.site, msg.content["config"], f"run-{context.run_id}")
    else:
        reply = site_he.decrypt_reply(rt.run, rt.site, msg.content["he"], f"run-{context.run_id}")
    reply["site"] = site_record(rt)
    return Message(content=reply, reply_to=msg)


@app.query()
@_reported_as_code
def query(msg: Message, context: Context) -> Message:
    """Before round 1: the site's image channel names and count (no path, no case data)."""
    rt = runtime(context)
    dataset = load_dataset(rt)
    names = sendable_channel_names(list(dataset.channel_names or (dataset.modality,)))
    reply = RecordDict({"site": site_record(rt, **{"channel-names": names}),
                        "metrics": MetricRecord({"num-channels": len(names)})})
    return Message(content=reply, reply_to=msg)


@app.evaluate()
@_reported_as_code
def evaluate(msg: Message, context: Context) -> Message:
    """Metrics of the received model on the site's test cases (or the demo's unseen site)."""
    config, server_round, timing, rt = _begin(msg, context, "evaluate")
    which = "unseen" if str(config.get("eval-dataset", "")) == "unseen" else "own"
    with timing.section("data"):
        dataset = load_dataset(rt, which)
        site_data = prepared_data(rt, dataset)
    model = rt.task.build_model()
    shared = msg.content["arrays"]
    local_names = set(model.state_dict()) - set(shared.keys())
    run_key = str(config.get("run-key", f"run-{context.run_id}"))
    # FedBN: a site evaluates with its own normalisation layers (latest saved).
    local_state = SiteStateStore(rt.site.state_dir, run_key).load_before("fedbn", server_round + 1) if local_names else None
    load_global(model, shared, local_state)
    with timing.section("evaluate"):
        metrics = rt.task.evaluate(model, site_data, "test")
    timing.emit()
    clean = {k: float(v) for k, v in metrics.items() if k != "num-examples"}
    if rt.run.personalization != "none" and which == "own" and bool(config.get("personal-metrics", True)):
        clean.update(personal_metrics(rt.task, SiteStateStore(rt.site.state_dir, run_key), server_round, site_data))
    reply = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": int(metrics.get("num-examples", 0)), **clean}),
            "site": site_record(rt, **({"eval-dataset": "unseen"} if which == "unseen" else {})),
        }
    )
    return Message(content=reply, reply_to=msg)
