"""DP-SGD step time vs plain SGD on MONAI 3D UNets, per Opacus grad_sample_mode; prints JSON.

Every mode gets its own copy of the same model and the steps are interleaved round-robin
(nodp, functorch, hooks, ..., nodp, functorch, ...), so load from other processes on a shared
machine hits all modes alike. ``ratio_vs_nodp`` is median(mode) / median(nodp); on a busy machine
``ratio_min_vs_nodp`` (fastest step of each) and ``ratio_cpu_vs_nodp`` (process CPU time, which
waiting for a core does not inflate) are better estimates of the uncontended cost.

The DP modes functorch/hooks/ew run through ``privacy.session.DPSiteSession.step`` (the code
the training loop uses); ``ghost`` (fast gradient clipping) goes through Opacus directly, as the
session does not offer it.

    python -m bench.privacy_speed --size 48 --steps 5 --threads 2
    python -m bench.privacy_speed --variants prelu-instance-2,relu-instance-1 --modes nodp,functorch
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.engine import make_dp_compatible
from privacy.session import DPSettings, DPSiteSession
from privacy.units import unit_key

MODES = ("nodp", "functorch", "hooks", "ew", "ghost")


class PerSampleDiceCE(nn.Module):
    """Dice + cross-entropy, one value per sample (``reduction='none'``) or reduced.

    The ``reduction`` attribute is what Opacus' ghost clipping switches to 'none'.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        dice = self.dice(logits, label).flatten(1).mean(1)
        ce = F.cross_entropy(logits, label[:, 0].long(), reduction="none").flatten(1).mean(1)
        per_sample = dice + ce
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def build_unet(variant: str) -> nn.Module:
    """``<act>-<norm>-<res units>``, e.g. ``prelu-instance-2`` (MONAI's default UNet blocks)."""
    act, norm, res = variant.split("-")
    norm_arg = {"instance": "INSTANCE", "instanceaffine": ("INSTANCE", {"affine": True}),
                "batch": "BATCH"}[norm]
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=int(res), act=act.upper(), norm=norm_arg)


def make_runner(mode: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, state_dir: str, tag: str = ""):
    """A zero-argument callable doing one training step of ``mode`` on the fixed batch (x, y)."""
    loss_fn = PerSampleDiceCE()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if mode == "nodp":
        def run():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        return run
    loader = DataLoader(TensorDataset(x.repeat(4, 1, 1, 1, 1), y.repeat(4, 1, 1, 1, 1)), batch_size=x.shape[0])
    if mode == "ghost":
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            gsm, dp_opt, criterion, _ = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, criterion=loss_fn,
                noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="ghost", poisson_sampling=False)

        def run():
            dp_opt.zero_grad(set_to_none=True)
            criterion(gsm(x), y).backward()
            dp_opt.step()
        return run
    settings = DPSettings(epsilon=1e6, delta=1e-5, grad_sample_mode=mode)
    session = DPSiteSession(model=model, optimizer=opt, train_loader=loader, settings=settings,
                            state_dir=state_dir, run_id="bench",
                            cases=[(unit_key("case", f"bench-{tag}-{mode}-{i}"),) for i in range(len(loader.dataset))],
                            rounds=1, local_epochs=10_000, seed=0, noise_seed=0)
    if session.begin_round() is not None:
        raise RuntimeError("benchmark session refused")
    per_sample = PerSampleDiceCE(reduction="none")

    def run():
        session.step(x, y, per_sample)
    return run


def bench_variant(variant: str, modes: list[str], size: int, batch: int, steps: int, state_dir: str) -> dict:
    torch.manual_seed(0)
    base = make_dp_compatible(build_unet(variant))
    x = torch.randn(batch, 1, size, size, size)
    y = torch.randint(0, 3, (batch, 1, size, size, size))
    runners, errors, times, cpu = {}, {}, {}, {}
    for mode in modes:
        try:
            runner = make_runner(mode, copy.deepcopy(base), x, y, state_dir, tag=variant)
            runner()  # warm-up (functorch builds its vmapped functions on the first step)
            runners[mode], times[mode], cpu[mode] = runner, [], []
        except Exception as exc:  # noqa: BLE001 - report why a mode cannot run this model
            errors[mode] = f"{type(exc).__name__}: {exc}"[:300]
    for _ in range(steps):
        for mode, runner in runners.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            runner()
            times[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - start_cpu)
    out = {"variant": variant, "params": sum(p.numel() for p in base.parameters()), "modes": {}}
    base_time = statistics.median(times["nodp"]) if "nodp" in times else None
    base_best = min(times["nodp"]) if "nodp" in times else None
    base_cpu = statistics.median(cpu["nodp"]) if "nodp" in cpu else None
    for mode in modes:
        if mode in errors:
            out["modes"][mode] = {"error": errors[mode]}
            continue
        med = statistics.median(times[mode])
        best = min(times[mode])
        out["modes"][mode] = {
            "seconds_per_step": round(med, 4),
            "min_seconds": round(best, 4),
            "ratio_vs_nodp": round(med / base_time, 3) if base_time else None,
            "ratio_min_vs_nodp": round(best / base_best, 3) if base_best else None,
            "cpu_seconds_per_step": round(statistics.median(cpu[mode]), 4),
            "ratio_cpu_vs_nodp": round(statistics.median(cpu[mode]) / base_cpu, 3) if base_cpu else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="prelu-instance-2,relu-instance-2,relu-instance-1,prelu-instance-0")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--size", type=int, default=48, help="cubic crop edge (voxels)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    results = []
    with tempfile.TemporaryDirectory() as state_dir:
        for variant in [v for v in args.variants.split(",") if v]:
            results.append(bench_variant(variant, modes, args.size, args.batch, args.steps, state_dir))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({
        "input": [args.batch, 1, args.size, args.size, args.size], "threads": args.threads,
        "steps": args.steps, "torch": torch.__version__, "results": results,
        "note": "timings are noisy on a shared machine; compare ratios (interleaved), not absolute times",
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
