"""One DP-SGD session per site per run: Opacus wrapping, budget checks and the ledger, across rounds.

Flower's Opacus example builds a new PrivacyEngine every round (epsilon resets). Here the site
process creates one :class:`DPSiteSession` when it first trains in a run and keeps it (e.g. in a
module-level dict keyed by run id inside the ClientApp process, or in the task's site state) for
all later rounds. Use::

    session = DPSiteSession(model=model, optimizer=opt, train_loader=loader,
                            settings=DPSettings.from_node_config(node_config, n_cases),
                            state_dir=state_dir, cases=case_units(data_path, case_names),
                            data_path=data_path, run_id=str(run_id), rounds=num_server_rounds,
                            local_epochs=epochs, seed=seed, study_epsilon=asked_or_None)
    # every round:
    session.module.load_state_dict(global_weights)      # the plain nn.Module, in place
    refusal = session.begin_round()                      # None, or a reason code (REFUSAL_CODES)
    if refusal: ...reply "refused" with 0 examples; session.refusal_detail says why...

Budget: the site's lifetime ``dp-epsilon`` bounds what any one case (or patient) ever spends,
over all studies (:mod:`privacy.ledger`); each study gets a share of it, ``study_epsilon`` (the
coordinator's ``dp-study-epsilon``; by default DEFAULT_STUDY_FRACTION of the lifetime budget),
and the noise is calibrated so the study's planned steps spend that share, or what the
worst-off case has left if that is less.
    for _ in range(local_epochs):
        for batch in session.train_loader:               # Poisson-sampled; batch size varies, may be 0
            if session.is_empty_batch(batch):
                session.empty_step()                     # still a (noise-only) step: never skip it
                continue
            session.step(batch["image"], batch["label"], per_sample_loss)
    metrics = session.end_round()                        # {"dp-epsilon-spent": ..., ...}
    weights = session.module.state_dict()

Privacy of the randomness: with ``secure_mode`` off, noise and batch sampling come from seeded
torch generators. If the server could guess the seed it could subtract the noise, so the seeds are
derived from a random site secret kept in the state folder (``privacy/noise-secret``, created once),
the run seed, the run id and the steps already in the ledger: reproducible for a given site state,
never predictable by the server, never reused across runs (reused noise would cancel out between
two runs' updates).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader

from fedimaging.io import atomic_write_bytes
from privacy.accounting import epsilon_of
from privacy.calibrate import BudgetExhausted, calibrate_noise_multiplier, planned_steps
from privacy.migrate import open_for_training
from privacy.settings import (  # noqa: F401  (re-exported: privacy.session is the public entry)
    DEFAULT_GRAD_SAMPLE_MODE,
    DEFAULT_STUDY_FRACTION,
    EPSILON_SLACK,
    GRAD_SAMPLE_MODES,
    REFUSAL_CODES,
    DPSettings,
    default_state_dir,
    study_share,
)


class StepResult(NamedTuple):
    """Mean per-sample loss of the (Poisson) batch, and its size (0 for an empty batch)."""

    loss: float
    num_samples: int


def _site_secret(state_dir: Path) -> bytes:
    """32 random bytes kept in the site state folder; created on first use (mode 0600)."""
    path = state_dir / "privacy" / "noise-secret"
    if not path.exists():
        try:
            atomic_write_bytes(path, secrets.token_bytes(32), mode=0o600)
        except OSError as exc:
            raise OSError(f"cannot create the site secret {path}: {exc}") from exc
    data = path.read_bytes()
    if len(data) != 32:
        raise ValueError(f"{path} is damaged (expected 32 bytes); delete it to create a new one")
    return data


def _derive_seed(secret: bytes, *parts: Any) -> int:
    digest = hashlib.sha256(secret + repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class DPSiteSession:
    """DP-SGD for one site and one run: wraps model/optimizer/loader once, keeps them across rounds.

    Attributes the training loop uses: ``module`` (the plain nn.Module: load global weights into
    it with ``load_state_dict``, read ``state_dict()`` from it), ``model`` (the Opacus wrapper to
    call in training), ``optimizer`` (the DPOptimizer), ``train_loader`` (Poisson sampling).
    ``noise_multiplier`` and ``sample_rate`` are fixed for the run. ``refusal`` (a REFUSAL_CODES
    key, ``refusal_detail`` the numbers) is set when the budget cannot pay for this run at all.
    ``cases`` are the hashed privacy units of the loader's samples, in order (one per case).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader,
        settings: DPSettings,
        state_dir: str | os.PathLike,
        cases: Sequence[Sequence[str]],
        run_id: str,
        rounds: int,
        local_epochs: int,
        seed: int = 0,
        noise_seed: int | None = None,
        study_epsilon: float | None = None,
        data_path: str | os.PathLike | None = None,
    ):
        self.settings = settings
        self.state_dir = Path(state_dir)
        self.run_id = str(run_id)
        self.local_epochs = int(local_epochs)
        self.cases = [tuple(keys) for keys in cases]
        samples = len(train_loader.dataset) if hasattr(train_loader.dataset, "__len__") else len(self.cases)
        if not self.cases or samples != len(self.cases):
            raise ValueError(f"{len(self.cases)} privacy units for {samples} training samples: one per case needed")
        self.study_epsilon = study_share(study_epsilon, settings.epsilon)
        self.ledger = open_for_training(self.state_dir, data_path, self.cases, settings.mechanism)
        if noise_seed is None:
            noise_seed = _derive_seed(_site_secret(self.state_dir), seed, self.run_id, self.ledger.total_steps)
        device = next(model.parameters()).device  # noise is drawn where the gradients live
        self._noise_generator = torch.Generator(device=device).manual_seed(noise_seed)
        sampling_generator = torch.Generator().manual_seed(noise_seed ^ 0x5DEECE66D)

        dp_loader = DPDataLoader.from_data_loader(train_loader, generator=sampling_generator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG off": intended, see the module docstring
            engine = PrivacyEngine(accountant=settings.mechanism, secure_mode=False)
            self.model, self.optimizer, self.train_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=dp_loader,
                noise_multiplier=1.0,  # replaced below once the run's steps are known
                max_grad_norm=settings.max_grad_norm,
                poisson_sampling=False,  # dp_loader already samples (with our generator)
                noise_generator=self._noise_generator,
                grad_sample_mode=settings.grad_sample_mode,
            )
        self.model.forbid_grad_accumulation()
        collate = getattr(self.train_loader, "collate_fn", None)
        if hasattr(collate, "sample_empty_shapes"):
            # Opacus guesses an empty first batch's structure from dataset[0]; for dictionary
            # datasets (MONAI) that guess is a list of dicts and torch.zeros fails. Without it an
            # empty first batch is [], which is_empty_batch() recognises (a noise-only step).
            collate.sample_empty_shapes = None
            collate.dtypes = None
        self.engine = engine
        # Exactly what make_private hands its accountant hook (Opacus: 1 / len(data_loader)).
        self.sample_rate = 1.0 / len(self.train_loader)
        self.steps_per_epoch = len(self.train_loader)
        self.planned_steps = planned_steps(rounds, self.local_epochs, self.steps_per_epoch)
        self.refusal: str | None = None
        self.refusal_detail = ""
        lifetime_spent, study_spent = self.spent(reload=False), self.study_spent()
        try:
            self.noise_multiplier = calibrate_noise_multiplier(
                constraints=[(h, settings.epsilon) for h in self.ledger.case_histories(self.cases)]
                + [(self.ledger.study_history(self.run_id), self.study_epsilon)],
                delta=settings.delta,
                sample_rate=self.sample_rate,
                steps=self.planned_steps,
                mechanism=settings.mechanism,
            )
        except BudgetExhausted:
            self.noise_multiplier = math.inf
        # Calibration lands up to EPSILON_SLACK below a target: what is left then is nothing.
        if lifetime_spent >= settings.epsilon - EPSILON_SLACK:
            self.refusal = "privacy-budget-exhausted"
        elif study_spent >= self.study_epsilon - EPSILON_SLACK:
            self.refusal = "privacy-study-share-spent"
        elif self.noise_multiplier > settings.max_noise_multiplier:
            self.refusal = "privacy-budget-too-small"
        if self.refusal is not None:
            self.refusal_detail = (
                f"{REFUSAL_CODES[self.refusal]}: worst case epsilon {lifetime_spent:.3f} of the lifetime "
                f"{settings.epsilon:.3f}, this study {study_spent:.3f} of its share {self.study_epsilon:.3f}; "
                f"{self.planned_steps} planned steps would need noise multiplier {self.noise_multiplier:.1f} "
                f"(at most {settings.max_noise_multiplier:g})"
            )
        self.optimizer.noise_multiplier = self.noise_multiplier
        self._reservation: str | None = None
        self._allowed_steps = 0
        self._round_start_steps = 0

    # ------------------------------------------------------------------ model access
    @property
    def module(self) -> nn.Module:
        """The plain model inside the Opacus wrapper (same parameter objects).

        Load global weights with ``session.module.load_state_dict(sd)`` (copies in place, so the
        optimizer and the per-sample hooks stay attached); never replace its Parameters or the
        model object itself. Its ``state_dict()`` has the plain keys (no ``_module.`` prefix).
        """
        return self.model._module

    def reset_optimizer_state(self) -> None:
        """Forget momentum/Adam moments (e.g. at the start of a round, as a fresh optimizer would)."""
        self.optimizer.original_optimizer.state.clear()

    # ------------------------------------------------------------------ rounds
    def _accountant_steps(self) -> int:
        return sum(int(n) for _, _, n in self.engine.accountant.history)

    def begin_round(self, local_epochs: int | None = None) -> str | None:
        """Reserve this round's steps in the ledger; returns a refusal reason if they do not fit."""
        if self._reservation is not None:
            raise RuntimeError("begin_round called twice without end_round")
        if self.refusal is not None:
            return self.refusal
        epochs = self.local_epochs if local_epochs is None else int(local_epochs)
        steps = epochs * self.steps_per_epoch
        reservation, over = self.ledger.reserve(
            self.run_id, self.cases, self.noise_multiplier, self.sample_rate, steps,
            epsilon_budget=self.settings.epsilon, delta=self.settings.delta, study_epsilon=self.study_epsilon,
        )
        if reservation is None:
            code = "privacy-budget-exhausted" if over == "lifetime" else "privacy-study-share-spent"
            self.refusal_detail = (
                f"{REFUSAL_CODES[code]}: this round's {steps} steps would exceed it (worst case epsilon "
                f"{self.spent():.3f} of {self.settings.epsilon:.3f}, study {self.study_spent():.3f} of "
                f"{self.study_epsilon:.3f})"
            )
            return code
        self._reservation = reservation
        self._allowed_steps = steps
        self._round_start_steps = self._accountant_steps()
        return None

    def step(
        self,
        inputs: torch.Tensor,
        targets: Any,
        per_sample_loss: Callable[[torch.Tensor, Any], torch.Tensor],
    ) -> StepResult:
        """One DP-SGD step: per-sample gradients, clipping, noise, optimizer update.

        ``per_sample_loss(outputs, targets)`` must return one loss per sample, shape ``[B]``, with
        no term that mixes samples (e.g. MONAI DiceLoss(reduction="none") averaged over its
        non-batch dims, never ``batch=True``). An empty Poisson batch still takes a (pure noise)
        step: skipping it would change the privacy analysis.
        """
        if self._reservation is None:
            raise RuntimeError("call begin_round() before step()")
        if self._accountant_steps() - self._round_start_steps >= self._allowed_steps:
            raise RuntimeError(f"this round was granted {self._allowed_steps} steps; no more allowed")
        batch = int(inputs.shape[0])
        if batch == 0:
            return self.empty_step()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = per_sample_loss(self.model(inputs), targets)
        if losses.dim() != 1 or losses.shape[0] != batch:
            raise ValueError(
                f"per_sample_loss must return one loss per sample (shape [{batch}]), got {tuple(losses.shape)}"
            )
        loss = losses.mean()  # Opacus loss_reduction="mean": per-sample grads are rescaled by B
        with warnings.catch_warnings():
            # inputs never require grad, so torch notes that full backward hooks fire on outputs
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        self.optimizer.step()
        return StepResult(float(loss.detach()), batch)

    def empty_step(self) -> StepResult:
        """The step for an empty Poisson batch: no data, but noise is added and the step counted."""
        if self._reservation is None:
            raise RuntimeError("call begin_round() before empty_step()")
        if self._accountant_steps() - self._round_start_steps >= self._allowed_steps:
            raise RuntimeError(f"this round was granted {self._allowed_steps} steps; no more allowed")
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        return StepResult(0.0, 0)

    @staticmethod
    def is_empty_batch(batch: Any) -> bool:
        """True for an empty Poisson batch, whatever its structure (dict, list, tuple, tensor).

        If the very first batch is empty, Opacus yields a list of empty tensors instead of the
        loader's usual structure (e.g. a dict), so test with this before unpacking.
        """
        if torch.is_tensor(batch):
            return batch.dim() > 0 and batch.shape[0] == 0
        if isinstance(batch, Mapping):
            values = list(batch.values())
        elif isinstance(batch, (list, tuple)):
            values = list(batch)
        else:
            return False
        if not values:
            return True
        return any(DPSiteSession.is_empty_batch(v) for v in values if torch.is_tensor(v) or isinstance(v, (Mapping, list, tuple)))

    def end_round(self) -> dict[str, float]:
        """Settle the round in the ledger (saved to disk); returns the metrics to report.

        ``dp-epsilon-spent`` is the lifetime epsilon of the worst-off training case (all studies),
        ``dp-study-epsilon-spent`` what this study spent of its share ``dp-study-epsilon``.
        """
        if self._reservation is None:
            raise RuntimeError("end_round called without begin_round")
        steps = self._accountant_steps() - self._round_start_steps
        self.ledger.settle(self._reservation, steps)
        self._reservation = None
        return {
            "dp-epsilon-spent": self.spent(reload=False),
            "dp-study-epsilon-spent": self.study_spent(),
            "dp-study-epsilon": float(self.study_epsilon),
            "dp-noise-multiplier": float(self.noise_multiplier),
            "dp-sample-rate": float(self.sample_rate),
            "dp-delta": float(self.settings.delta),
            "dp-steps": float(steps),
        }

    def spent(self, reload: bool = True) -> float:
        """Lifetime epsilon of the worst-off of this run's training cases (re-read from disk)."""
        if reload:
            self.ledger.reload()
        return self.ledger.spent(self.cases, self.settings.delta)

    def study_spent(self) -> float:
        """Epsilon this study (run) has spent at this site so far, open rounds included."""
        return epsilon_of(self.ledger.study_history(self.run_id), self.settings.delta, self.settings.mechanism)
