"""Personalized models (``personalization=finetune|ditto``): trained, kept and evaluated at the site.

A site's personal model is a full state dict saved weights-only in its ``state-dir`` (kind
``personal``, per round, atomically, like FedBN layers), so it survives a SuperNode restart and a
resumed run continues it. Nothing here is ever put into a reply except the ``personal-<metric>``
numbers of its evaluation on the site's test cases.

- ``finetune``: each round, a copy of the received global model (with the site's FedBN layers)
  is trained ``finetune-epochs`` on the site's training cases and becomes the personal model.
- ``ditto`` (Li et al. 2021): the personal model continues from the previous round's and is
  trained ``local-epochs`` with ``ditto-lambda/2 * ||w_personal - w_global||^2`` toward the
  received global model; the global update is computed and aggregated exactly as without it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from app.config import RunConfig
from app.site_state import SiteStateStore
from tasks import LocalTrainingOptions, Task

log = logging.getLogger("fedimaging.site")
KIND = "personal"


def train_personal(run: RunConfig, task: Task, store: SiteStateStore, server_round: int,
                   received: dict[str, torch.Tensor], site_data: Any, lr: float, seed: int) -> None:
    """Update and save this site's personal model for ``server_round`` (``received``: the global
    model as the site loaded it, FedBN layers included)."""
    model = task.build_model()
    start = received
    if run.personalization == "ditto":
        start = store.load_before(KIND, server_round) or received
    model.load_state_dict(start)
    if run.personalization == "ditto":
        options = LocalTrainingOptions(epochs=run.local_epochs, lr=lr, seed=seed, proximal_mu=run.ditto_lambda,
                                       proximal_anchor=received)
    else:
        options = LocalTrainingOptions(epochs=run.finetune_epochs, lr=lr, seed=seed)
    result = task.train(model, site_data, options)
    store.save(KIND, server_round, model.state_dict())
    log.info("Personal model (%s) updated for round %d: loss %.4f", run.personalization, server_round, result.loss)


def personal_metrics(task: Task, store: SiteStateStore, server_round: int, site_data: Any) -> dict[str, float]:
    """``personal-<metric>`` of the latest personal model on the test cases ({} before it exists)."""
    state = store.load_before(KIND, server_round + 1)
    if state is None:
        return {}
    model = task.build_model()
    model.load_state_dict(state)
    metrics = task.evaluate(model, site_data, "test")
    return {f"personal-{k}": float(v) for k, v in metrics.items() if k != "num-examples"}
