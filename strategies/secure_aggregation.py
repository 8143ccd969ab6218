"""Encrypted aggregation (run config ``secure-aggregation=he``): the coordinator adds ciphertexts.

A variant of any averaging strategy that replaces one step, the aggregation: each site sends
its case-weighted update ``n_i * (local_i - global)`` as CKKS ciphertexts (``app.site_he``);
the coordinator, holding only the public context, checks each reply (key id, parameter layout,
ciphertext count and sizes; a bad one is excluded with its reason), adds the ciphertexts and the
plaintext case counts, and asks one contributing site to decrypt the *sum*. The aggregate
``global + sum / sum(n_i)`` is then handed to the strategy's own ``aggregate_arrays`` as if it
were a single update, so FedAvg/FedProx/FedBN average and FedAdam/FedYogi take their server
step on it exactly as without encryption, and checkpoints, ``best.pt``, resume, the report and
cross-site evaluation see an ordinary plaintext global model. No site's update is ever
decrypted alone: a round with fewer than two encrypted updates leaves the model unchanged.

Options that need individual plaintext updates at the coordinator are refused at start
(:func:`refusal`). The coordinator reads the public context from run config
``he-public-context`` (deployment: written by ``deploy init``), else asks a site for it (query
``he_public``); either way it refuses a context that holds a secret key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from privacy import he_keys, he_vectors

from . import validation
from .extension import StrategyExtension
from .metrics import WEIGHT_KEY
from .records import Arrays, ScreenResult, SiteUpdate
from .screening import ReplyScreener

if TYPE_CHECKING:
    from .base import FedImagingFedAvg

MODES = ("off", "he")
MIN_CONTRIBUTORS = 2
QUERY_PUBLIC = f"{MessageType.QUERY}.he_public"
QUERY_DECRYPT = f"{MessageType.QUERY}.he_decrypt"
# Strategies whose aggregate is a function of the case-weighted mean of the updates.
HE_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedbn")


def refusal(run: Any) -> str | None:
    """Why the run config cannot run with ``secure-aggregation=he`` (naming the key), else None.

    ``run`` is the parsed run config (attribute names as its keys, ``-`` -> ``_``).
    """
    if run.secure_aggregation == "off":
        return None
    refused = _refused_key(run)
    if refused is None:
        return None
    key, why = refused
    return (f"run config '{key}={getattr(run, key.replace('-', '_'))}' cannot be used with "
            f"secure-aggregation=he: {why}")


def _refused_key(run: Any) -> tuple[str, str] | None:
    if run.strategy not in HE_STRATEGIES:
        return ("strategy", f"{run.strategy!r} needs every site's plaintext update at the coordinator; "
                f"with secure-aggregation=he use one of {', '.join(HE_STRATEGIES)}")
    if run.central_dp != "off":
        return ("central-dp", "central DP clips and noises individual plaintext updates at the coordinator; "
                "turn it off with secure-aggregation=he (sites can use dp-epsilon)")
    if run.relative_update_norm > 0:
        return ("relative-update-norm", "needs every site's update norm at the coordinator; "
                "with secure-aggregation=he set max-update-norm and the sites clip their own update")
    if run.max_update_norm > 0 and run.update_norm_action != "clip":
        return ("update-norm-action", "the coordinator cannot check an encrypted update's norm; with "
                "secure-aggregation=he set update-norm-action=clip: each site clips its own update")
    if run.local_baselines:
        return ("local-baselines", "local-only baselines send one site's model to the coordinator")
    demo = getattr(run, "uses_demo", False)
    if (run.demo_sites if demo else run.min_available_sites) < MIN_CONTRIBUTORS:
        key = "demo-sites" if demo else "min-available-sites"
        return (key, f"secure aggregation needs >= {MIN_CONTRIBUTORS} sites (one site's sum is its update)")
    return None


class SecureAggregator:
    """The coordinator's side, independent of the strategy class: public context, checks, sum.

    One instance per run; :meth:`begin_round`, :meth:`check` per reply, :meth:`settle` after
    screening, :meth:`aggregate` with the accepted updates, :meth:`line` for ``metrics.jsonl``.
    """

    def __init__(self, public_context_file: str, run_key: str) -> None:
        self.public = None
        self.key_id = ""
        self.run_key = run_key
        if public_context_file:  # deployment: the coordinator's copy from deploy init
            self.public, self.key_id = he_keys.read_key_file(Path(public_context_file).expanduser(),
                                                             need_secret=False)
        self._vectors: dict[str, list] = {}
        self._line: dict[str, Any] = {}

    def fetch_public_context(self, grid: Grid, node_ids: Iterable[int], timeout: float | None) -> None:
        """The study's public context from the first site that gives a valid one (if none is set)."""
        if self.public is not None:
            return
        for node in node_ids:
            content = RecordDict({"config": ConfigRecord({"query": "he-public", "run-key": self.run_key})})
            msg = Message(content=content, dst_node_id=node, message_type=QUERY_PUBLIC)
            for reply in grid.send_and_receive([msg], timeout=timeout):
                record = None if reply.has_error() else reply.content.config_records.get("he")
                try:
                    if record is None:
                        raise he_keys.KeyMaterialError("no 'he' record in the answer")
                    ctx, key_id = he_keys.decode(record["context"], need_secret=False,
                                                 origin="the public context a site sent")
                except (he_keys.KeyMaterialError, KeyError, TypeError) as exc:
                    log(WARNING, "secure aggregation: node %s gave no usable public context: %s", node, exc)
                    continue
                self.public, self.key_id = ctx, key_id
                log(INFO, "secure aggregation: public CKKS context, key id %s", key_id)
                return
        raise RuntimeError("secure-aggregation=he: no site answered with a public CKKS context "
                           "(are the sites' key files in place? see README 'Encrypted aggregation')")

    def begin_round(self, sent: Mapping[str, np.ndarray]) -> None:
        self._vectors, self._line = {}, {}
        self._values, self._layout = he_vectors.num_values(sent), he_vectors.layout_id(sent)

    def check(self, site: str, content: RecordDict, arrays_key: str) -> str | None:
        """Why this (otherwise valid) train reply cannot be added, or None (its ciphertexts are kept)."""
        record = content.config_records.get("he")
        if record is None:
            return ("sent a plaintext update: secure-aggregation=he accepts encrypted updates only"
                    if arrays_key in content.array_records else "reply has no encrypted update ('he')")
        if str(record.get("key-id", "")) != self.key_id:
            return f"encrypted under another key (key id {str(record.get('key-id', ''))[:32]!r}, study's {self.key_id!r})"
        if str(record.get("layout", "")) != self._layout or record.get("num-values") != self._values:
            return f"encrypted parameter layout does not match the model sent ({self._values} values expected)"
        chunks = record.get("chunks")
        if not isinstance(chunks, list):
            return "encrypted update has no ciphertext list"
        try:
            self._vectors[site] = he_vectors.load_chunks(self.public, chunks, self._values)
        except ValueError as exc:
            return validation.short(f"bad ciphertext: {exc}")
        self._line.setdefault("bytes-up", {})[site] = sum(len(c) for c in chunks)
        return None

    def settle(self, accepted: list, excluded: dict[str, str]) -> list:
        """Drop what was excluded later; below :data:`MIN_CONTRIBUTORS` nothing is added (model unchanged)."""
        names = {u.site for u in accepted}
        self._vectors = {k: v for k, v in self._vectors.items() if k in names}
        if 0 < len(accepted) < MIN_CONTRIBUTORS:
            for update in accepted:
                excluded[update.site] = (f"only {len(accepted)} encrypted update(s) this round: secure "
                                         f"aggregation needs >= {MIN_CONTRIBUTORS}; model unchanged")
            accepted = []
            self._vectors = {}
        self._line.update({"mode": "he", "key-id": self.key_id, "contributors": len(accepted),
                           "ciphertexts-per-site": len(he_vectors.chunk_sizes(self._values))})
        self._line["bytes-up"] = {k: v for k, v in self._line.get("bytes-up", {}).items() if k in self._vectors}
        return accepted

    def aggregate(self, server_round: int, current: Mapping[str, np.ndarray], updates: list, grid: Grid,
                  timeout: float | None, inner: Callable[[list], Mapping[str, np.ndarray]]):
        """Ciphertext sum -> one site decrypts -> ``inner([the mean as one update])``; unchanged if none can."""
        t0 = time.monotonic()
        total_ct = he_vectors.sum_chunks([self._vectors.pop(u.site) for u in updates])
        weight_sum = float(sum(u.weight for u in updates))
        self._line.update({"weights-sum": weight_sum, "sum-seconds": round(time.monotonic() - t0, 3),
                           "bytes-down-decrypt": sum(len(c) for c in total_ct)})
        total, by = self._decrypt(server_round, total_ct, updates, grid, timeout)
        self._line["decrypted-by"] = by
        if total is None:
            log(WARNING, "secure aggregation: round %d: no site decrypted the sum; model unchanged", server_round)
            return {k: np.asarray(v) for k, v in current.items()}
        mean_model = he_vectors.apply_mean_delta(current, total, weight_sum)
        return inner([SiteUpdate("secure-aggregate", -1, mean_model, weight_sum, RecordDict())])

    def _decrypt(self, server_round: int, chunks: list[bytes], updates: list, grid: Grid,
                 timeout: float | None) -> tuple[np.ndarray | None, str | None]:
        """Ask the contributing sites in turn to decrypt the sum; the first valid answer wins."""
        request = ConfigRecord({"chunks": chunks, "num-values": self._values, "server-round": server_round,
                                "key-id": self.key_id, "contributors": len(updates), "run-key": self.run_key})
        for update in updates:
            msg = Message(content=RecordDict({"he": request}), dst_node_id=update.node_id,
                          message_type=QUERY_DECRYPT)
            for reply in grid.send_and_receive([msg], timeout=timeout):
                total = _decrypted_sum(reply, self._values)
                if total is not None:
                    return total, update.site
                log(WARNING, "secure aggregation: %s did not decrypt the sum (%s)", update.site,
                    reply.error.reason if reply.has_error() else "bad answer")
        return None, None

    def line(self) -> dict[str, Any]:
        return {"secure-aggregation": dict(self._line)}


class SecureAggregationExtension(StrategyExtension):
    """The strategy's hooks under secure-aggregation=he: aggregation on the ciphertext sum."""

    state_key = "secure-aggregation"

    def __init__(self, strategy: FedImagingFedAvg) -> None:
        self.strategy = strategy
        self.he = SecureAggregator(strategy.settings.he_public_context, strategy.run_dir.root.name)
        self.grid: Grid | None = None
        self.timeout: float | None = None

    def aggregate(self, server_round: int, current: Arrays, updates: list[SiteUpdate]) -> Arrays:
        inner = self.strategy.aggregate_arrays
        return self.he.aggregate(server_round, current, updates, self.grid, self.timeout,
                                 lambda one: inner(server_round, current, one))

    def train_line(self, server_round: int, released: bool) -> dict[str, Any]:
        return self.he.line()

    def restore(self, state: Mapping[str, Any] | None, root: str) -> None:
        """Nothing to restore: no key material is saved; the public context is read or fetched again."""


class _EncryptedReplyScreener(ReplyScreener):
    """Screens train replies that carry ciphertexts ('he') instead of arrays."""

    def __init__(self, he: SecureAggregator) -> None:
        super().__init__()
        self.he = he

    def screen_train(self, msgs, sent, arrays_key, *, dp_required, check_extra) -> ScreenResult:
        self.he.begin_round(sent)
        screened = ScreenResult()
        for site, msg, metrics in self._screen_common(msgs, screened):
            weight = float(metrics[WEIGHT_KEY])
            if weight <= 0:
                reason = "reported 0 training cases"
            elif dp_required and not validation.has_dp_metadata(metrics):
                reason = "no DP metadata (dp-required=true): the site must train with DP-SGD"
            else:
                reason = self.he.check(site, msg.content, arrays_key)
            if reason:
                screened.excluded[site] = reason
                continue
            screened.accepted.append(SiteUpdate(site, int(msg.metadata.src_node_id), {}, weight, msg.content))
        screened.accepted = self.he.settle(screened.accepted, screened.excluded)
        return screened


class _Driver:
    """Runs the strategy's own rounds after giving the extension the grid and the public context."""

    def __init__(self, strategy: FedImagingFedAvg, extension: SecureAggregationExtension) -> None:
        self.strategy, self.extension = strategy, extension

    def start(self, **kwargs: Any) -> Any:
        grid = kwargs["grid"]
        self.extension.grid, self.extension.timeout = grid, kwargs.get("timeout")
        self.extension.he.fetch_public_context(grid, sorted(int(n) for n in grid.get_node_ids()), kwargs.get("timeout"))
        return self.strategy.start(**kwargs)


def wrap(strategy: FedImagingFedAvg) -> FedImagingFedAvg:
    """Encrypted aggregation around an unmodified strategy (hooks, screener, driver)."""
    extension = SecureAggregationExtension(strategy)
    strategy.extensions.append(extension)
    strategy.screener = _EncryptedReplyScreener(extension.he)
    strategy.he = extension.he
    strategy.driver = _Driver(strategy, extension)
    return strategy


def _decrypted_sum(reply: Message, values: int) -> np.ndarray | None:
    if reply.has_error() or "aggregate" not in reply.content.array_records:
        return None
    record = reply.content.array_records["aggregate"]
    if list(record.keys()) != ["sum"]:
        return None
    total = record["sum"].numpy()
    if total.shape != (values,) or not np.issubdtype(total.dtype, np.floating) or not np.isfinite(total).all():
        return None
    return total.astype(np.float64)
