"""Numpy "hospitals" for strategy tests: local least squares, trained by full-batch gradient descent.

Site i holds ``(A_i, y_i)`` and the model ``{"w": (d,), "b": (1,), "steps": int64}``; its loss is
``0.5 / n_i * ||A_i w + b - y_i||^2``. ``b`` is the FedBN site-local parameter when the strategy
keeps it local. The site follows the message contract: FedProx's ``proximal-mu``, SCAFFOLD option
II variates (site state kept in the object, like the real site's state file), local baselines,
evaluation with ``dice`` = 1 / (1 + loss) and the ``unseen`` evaluation dataset.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

D = 4


def make_problem(num_sites: int = 3, seed: int = 0, sizes: tuple[int, ...] | None = None,
                 heterogeneity: float = 1.0):
    """Sites with very different curvatures and targets: strong client drift under FedAvg."""
    rng = np.random.default_rng(seed)
    sizes = sizes or tuple(20 + 10 * i for i in range(num_sites))
    data = []
    for i, n in enumerate(sizes):
        scales = np.exp(heterogeneity * rng.uniform(-1.0, 1.0, size=D))
        a = rng.normal(size=(n, D)) * scales
        w_true = rng.normal(size=D) * (1 + heterogeneity * i)
        y = a @ w_true + 0.1 * rng.normal(size=n)
        data.append((a, y))
    return data


def global_optimum(data) -> np.ndarray:
    """Minimiser of the case-weighted objective sum_i n_i/N f_i (without bias)."""
    h = sum(a.T @ a for a, _ in data)
    g = sum(a.T @ y for a, y in data)
    return np.linalg.solve(h, g)


def initial_model() -> dict[str, np.ndarray]:
    return {"w": np.zeros(D), "b": np.zeros(1), "steps": np.array(0, dtype=np.int64)}


class LeastSquaresSite:
    """One site; ``local_keys`` are kept at the site (FedBN) and never returned."""

    def __init__(self, name: str, a: np.ndarray, y: np.ndarray, *, local_steps: int = 20,
                 use_bias: bool = False, local_keys: frozenset[str] = frozenset(),
                 unseen: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.name, self.a, self.y = name, a, y
        self.local_steps = local_steps
        self.use_bias = use_bias
        self.local_keys = local_keys
        self.local_state: dict[str, np.ndarray] = {}
        self.c_i: dict[str, np.ndarray] | None = None
        self.unseen = unseen
        self.calls = 0

    # --- maths ---------------------------------------------------------------------------
    def loss(self, model: dict[str, np.ndarray], a=None, y=None) -> float:
        a = self.a if a is None else a
        y = self.y if y is None else y
        r = a @ model["w"] + (model["b"][0] if self.use_bias else 0.0) - y
        return float(0.5 * np.mean(r**2))

    def grads(self, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        r = self.a @ model["w"] + (model["b"][0] if self.use_bias else 0.0) - self.y
        n = len(self.y)
        return {"w": self.a.T @ r / n, "b": np.array([r.mean()]) if self.use_bias else np.zeros(1)}

    # --- message handling ------------------------------------------------------------------
    def __call__(self, msg: Message) -> RecordDict:
        self.calls += 1
        received = {k: v.numpy().copy() for k, v in msg.content.array_records["arrays"].items()}
        cfg = msg.content.config_records["config"]
        model = {**received}
        for key in self.local_keys:  # site-local layers start from the site's own initial model
            model[key] = self.local_state.get(key, initial_model()[key]).copy()
        if msg.metadata.message_type == "evaluate":
            if cfg.get("eval-dataset") == "unseen":
                a, y = self.unseen
                loss = self.loss(model, a, y)
                n = len(y)
            else:
                loss, n = self.loss(model), len(self.y)
            return RecordDict({"metrics": MetricRecord({"num-examples": n, "loss": loss, "dice": 1 / (1 + loss)}),
                               "site": ConfigRecord({"site-name": self.name})})
        return self.train(msg, received, model, cfg)

    def train(self, msg, received, model, cfg) -> RecordDict:
        lr = float(cfg["lr"])
        steps = self.local_steps * int(cfg["local-epochs"])
        mu = float(cfg.get("proximal-mu", 0.0))
        scaffold = "scaffold-c" in msg.content.array_records and not cfg.get("local-baseline", False)
        if scaffold:
            c = {k: v.numpy() for k, v in msg.content.array_records["scaffold-c"].items()}
            if self.c_i is None:
                self.c_i = {k: np.zeros_like(v) for k, v in c.items()}
        x = {k: v.copy() for k, v in model.items()}
        y = {k: v.copy() for k, v in model.items()}
        for _ in range(steps):
            g = self.grads(y)
            for key in ("w", "b"):
                step = g[key] + mu * (y[key] - x[key])
                if scaffold and key in c:
                    step = step - self.c_i[key] + c[key]
                y[key] = y[key] - lr * step
        y["steps"] = np.array(int(y["steps"]) + steps, dtype=np.int64)
        for key in self.local_keys:
            self.local_state[key] = y[key].copy()
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(np.asarray(y[k])) for k in received}),
            "metrics": MetricRecord({"num-examples": len(self.y), "loss": self.loss(y)}),
            "site": ConfigRecord({"site-name": self.name}),
        })
        if scaffold:
            new_c = {}
            delta = {}
            for key in received:
                if np.issubdtype(received[key].dtype, np.floating):
                    new_c[key] = self.c_i[key] - c[key] + (x[key] - y[key]) / (steps * lr)
                else:
                    new_c[key] = self.c_i[key]
                delta[key] = (new_c[key] - self.c_i[key]).astype(received[key].dtype)
            self.c_i = new_c
            content["scaffold-delta-c"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in delta.items()})
        return content
