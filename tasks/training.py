"""The local training loop both tasks share, with the FedProx and SCAFFOLD site-side terms.

FedProx adds ``mu/2 * ||w - w_global||^2`` to every step's loss (Ditto the same, with
``w_global`` the received global model while ``w`` is the site's personal model). SCAFFOLD corrects every
gradient by ``c - c_i`` and, after the round, sets the site variate to the mean raw local
gradient: Karimireddy et al.'s option II (``c_i - c + (w_global - w_local) / (K * lr)``) under
plain SGD, and still correct with momentum, where option II's formula diverged on the demo.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from tasks.base import LocalTrainingOptions, Task, TrainResult, device


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``adam`` (default, fast convergence) or ``sgd`` (momentum 0.9; SCAFFOLD's assumption)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_local(
    model: nn.Module,
    batches: Callable[[int], Iterable[Any]],
    step_loss: Callable[[nn.Module, Any], torch.Tensor],
    options: LocalTrainingOptions,
    optimizer_name: str,
    lr: float,
) -> tuple[float, int, float, dict[str, torch.Tensor] | None]:
    """Run ``options.epochs`` epochs; return (mean loss, steps, seconds, SCAFFOLD delta-c).

    ``batches(epoch)`` yields the epoch's batches (seeded by the caller); ``step_loss`` runs
    the forward pass and returns the task loss of one batch.
    """
    start = time.perf_counter()
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    global_params = trainable_state(model) if (options.proximal_mu > 0 or options.scaffold_server) else None
    if options.proximal_mu > 0 and options.proximal_anchor is not None:
        global_params = {n: options.proximal_anchor[n].detach().to(p.device) for n, p in named}
    optimizer = make_optimizer(optimizer_name, (p for _, p in named), lr)
    correction = None
    grad_sums: dict[str, torch.Tensor] = {}
    if options.scaffold_server is not None:
        site_c = options.scaffold_site or {k: torch.zeros_like(v) for k, v in options.scaffold_server.items()}
        correction = {k: options.scaffold_server[k] - site_c[k] for k in options.scaffold_server}
        grad_sums = {n: torch.zeros_like(p) for n, p in named if n in correction}
    total, steps = 0.0, 0
    for epoch in range(options.epochs):
        for batch in batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = step_loss(model, batch)
            task_loss = float(loss.detach())
            if options.proximal_mu > 0:
                prox = sum(((p - global_params[n]) ** 2).sum() for n, p in named)
                loss = loss + 0.5 * options.proximal_mu * prox
            loss.backward()
            if correction is not None:
                for n, p in named:
                    if p.grad is not None and n in correction:
                        grad_sums[n].add_(p.grad)
                        p.grad.add_(correction[n].to(p.grad.device))
            optimizer.step()
            total += task_loss
            steps += 1
    delta_c = None
    if correction is not None and steps > 0:
        # New site variate = the mean raw (uncorrected) local gradient. With plain SGD this is
        # exactly SCAFFOLD's option II, c_i - c + (x - y_i) / (K lr); with momentum (or Adam, or a
        # learning rate that changes per round) option II's displacement over K lr overestimates
        # the gradient (by up to 1 / (1 - momentum) = 10x) and the corrections blow up.
        site_c = options.scaffold_site or {k: torch.zeros_like(v) for k, v in options.scaffold_server.items()}
        delta_c = {}
        for k in options.scaffold_server:
            new_c = grad_sums[k].cpu() / steps if k in grad_sums else site_c[k]
            delta_c[k] = new_c - site_c[k]
    return total / max(steps, 1), steps, time.perf_counter() - start, delta_c


def train_dp(
    session: Any,
    epochs: int,
    split_batch: Callable[[Any], tuple[torch.Tensor, Any]],
    per_sample_loss: Callable[[torch.Tensor, Any], torch.Tensor],
) -> tuple[float, int, float]:
    """DP-SGD epochs through a ``privacy.DPSiteSession`` (already ``begin_round``-ed).

    The session owns the Opacus-wrapped model, optimizer and Poisson-sampling loader; an empty
    Poisson batch is still a (noise-only) step. Returns (mean loss, steps, seconds).
    """
    start = time.perf_counter()
    session.reset_optimizer_state()  # a fresh optimizer each round, as without DP
    total, steps = 0.0, 0
    for _ in range(epochs):
        for batch in session.train_loader:
            if session.is_empty_batch(batch):
                session.empty_step()
            else:
                inputs, targets = split_batch(batch)
                total += session.step(inputs, targets, per_sample_loss).loss
            steps += 1
    return total / max(steps, 1), steps, time.perf_counter() - start


def train_round(task: Task, model: nn.Module, site_data: Any, options: LocalTrainingOptions, *,
                batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                drop_last: bool = False) -> TrainResult:
    """One round of local training, the same for every task: DP-SGD through the site's session,
    else ``train_local`` over seeded, shuffled batches; the task gives only its loss."""
    from monai.data import DataLoader

    from tasks.data import seeded_generator

    dev = device()
    model.to(dev)
    site_data.reseed(options.seed)
    if options.dp is not None:
        loss, steps, seconds = train_dp(options.dp, options.epochs, task.split_batch, task.per_sample_loss)
        return TrainResult(site_data.num_train_cases, loss, steps, seconds)

    def batches(epoch: int):
        yield from DataLoader(site_data.train, batch_size=task.settings.batch_size, shuffle=True, num_workers=0,
                              drop_last=drop_last, generator=seeded_generator(options.seed * 1000 + epoch))

    def step_loss(net: nn.Module, batch: dict) -> torch.Tensor:
        return batch_loss(net(batch["image"].to(dev)), batch["label"].to(dev))

    lr = options.lr if options.lr is not None else task.settings.lr
    loss, steps, seconds, delta_c = train_local(model, batches, step_loss, options, task.settings.optimizer, lr)
    return TrainResult(site_data.num_train_cases, loss, steps, seconds, scaffold_delta=delta_c)
