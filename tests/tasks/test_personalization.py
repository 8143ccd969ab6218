"""Ditto's site update against a hand computation, and where a site's personal model starts from."""

from __future__ import annotations

import torch
from torch import nn

from app.config import parse_run_config
from app.site_personal import personal_metrics, train_personal
from app.site_state import SiteStateStore
from tasks.base import LocalTrainingOptions, TrainResult
from tasks.training import train_local


def _problem():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        model.bias.fill_(0.25)
    anchor = {"weight": torch.tensor([[0.0, 1.0, -1.0]]), "bias": torch.tensor([1.5])}
    return x, y, model, anchor


def test_ditto_step_is_sgd_on_loss_plus_lambda_pull_toward_the_global_model():
    x, y, model, anchor = _problem()
    lam, lr = 0.7, 0.05
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    options = LocalTrainingOptions(epochs=1, lr=lr, proximal_mu=lam, proximal_anchor=anchor)
    train_local(model, lambda epoch: [(x, y)], lambda net, b: ((net(b[0]) - b[1]) ** 2).mean(), options, "sgd", lr)

    # By hand: loss = mean((x w^T + b - y)^2); grad_w = 2/n r^T x, grad_b = 2/n sum r; plus lam (w - w_global).
    # SGD with momentum takes exactly the plain gradient step on its first step.
    r = x @ w0.T + b0 - y
    grad_w = 2 / len(x) * r.T @ x + lam * (w0 - anchor["weight"])
    grad_b = 2 / len(x) * r.sum(0) + lam * (b0 - anchor["bias"])
    torch.testing.assert_close(model.weight.detach(), w0 - lr * grad_w)
    torch.testing.assert_close(model.bias.detach(), b0 - lr * grad_b)


class _LinearTask:
    """The part of a Task that personalization uses: a model, a train round, an evaluation."""

    def __init__(self):
        self.started_from = []

    def build_model(self):
        return nn.Linear(3, 1)

    def train(self, model, site_data, options):
        self.started_from.append({k: v.clone() for k, v in model.state_dict().items()})
        self.options = options
        x, y = site_data
        loss, steps, seconds, _ = train_local(model, lambda e: [(x, y)], lambda n, b: ((n(b[0]) - b[1]) ** 2).mean(),
                                              options, "sgd", options.lr)
        return TrainResult(len(x), loss, steps, seconds)

    def evaluate(self, model, site_data, split):
        x, y = site_data
        with torch.no_grad():
            return {"num-examples": len(x), "mse": float(((model(x) - y) ** 2).mean())}


def test_ditto_continues_its_own_model_and_finetune_restarts_from_the_global_one(tmp_path):
    x, y, model, anchor = _problem()
    received = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("ditto", "finetune"):
        run = parse_run_config({"personalization": mode, "ditto-lambda": 0.3, "finetune-epochs": 2})
        task, store = _LinearTask(), SiteStateStore(tmp_path / mode, "run-1")
        assert personal_metrics(task, store, 1, (x, y)) == {}  # no personal model yet
        train_personal(run, task, store, 1, received, (x, y), 0.05, seed=1)
        first = store.load_before("personal", 2)
        train_personal(run, task, store, 2, received, (x, y), 0.05, seed=2)
        expected_start = first if mode == "ditto" else received
        for k in received:
            torch.testing.assert_close(task.started_from[0][k], received[k])
            torch.testing.assert_close(task.started_from[1][k], expected_start[k])
        if mode == "ditto":
            assert task.options.proximal_mu == 0.3 and task.options.proximal_anchor is received
            assert task.options.epochs == run.local_epochs
        else:
            assert task.options.proximal_mu == 0 and task.options.epochs == 2
        # what the site reports: its latest personal model's metric, under personal-<name>
        latest = nn.Linear(3, 1)
        latest.load_state_dict(store.load_before("personal", 3))
        with torch.no_grad():
            mse = float(((latest(x) - y) ** 2).mean())
        assert personal_metrics(task, store, 2, (x, y)) == {"personal-mse": mse}
