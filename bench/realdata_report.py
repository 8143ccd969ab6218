"""The real-data benchmarks' Markdown table and goal checks (from ``realdata.json``'s content)."""

from __future__ import annotations

from typing import Any

DP_CONTROL = "fedavg-dp-recipe-without-dp"  # bench.realdata's arm of the DP recipe without DP
MAX_SITE_COLUMNS = 10  # more sites: min / median / max instead of one column each
PEAK_RSS_GOAL_MB = 8 * 1024


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _site_cells(arm: dict, sites: list[str], metric: str | None = None) -> list[str]:
    metric = metric or arm["metric"]
    values = [arm["sites"][s].get(metric) for s in sites]
    if len(sites) <= MAX_SITE_COLUMNS:
        return [_f(v) for v in values]
    finite = sorted(v for v in values if v is not None)
    if not finite:
        return ["-"] * 3
    return [_f(finite[0]), _f(finite[len(finite) // 2]), _f(finite[-1])]


def markdown(report: dict) -> str:
    arms = report["arms"]
    sites = sorted(next(iter(arms.values()))["sites"], key=lambda s: int(s.split("-")[1]))
    metric = next(iter(arms.values()))["metric"]
    groups = {s: c.get("groups") for s, c in report["split"].get("counts", {}).items()}
    site_head = [s + (f" ({', '.join(groups[s])})" if groups.get(s) and report["benchmark"] == "hippocampus" else "")
                 for s in sites] if len(sites) <= MAX_SITE_COLUMNS else ["site min", "site median", "site max"]
    if report["benchmark"] == "hippocampus":
        labels = [k[5:] for k in next(iter(arms.values()))["held_out"] if k.startswith("dice-")]
        extra_head = [f"held-out {name}" for name in labels] + ["held-out mean"]
        extra = lambda a: [_f(a["held_out"].get(f"dice-{n}")) for n in labels] + [_f(a["held_out"].get("dice"))]  # noqa: E731
    else:
        extra_head = ["held-out AUC", "held-out accuracy"]
        extra = lambda a: [_f(a["held_out"].get("auc")), _f(a["held_out"].get("accuracy"))]  # noqa: E731
    head = ["arm", *site_head, f"mean site {metric}", *extra_head, "seconds", "peak RSS (MB)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, arm in arms.items():
        cells = [name, *_site_cells(arm, sites), _f(arm["mean"]), *extra(arm), f"{arm['seconds']:.0f}",
                 f"{arm['peak_rss_mb']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
        if "personal_mean" in arm:  # each personal model at its own site only: no held-out cells
            cells = [f"{name}: personal models", *_site_cells(arm, sites, f"personal-{metric}"),
                     _f(arm["personal_mean"]), *["n/a"] * len(extra_head), "", ""]
            rows.append("| " + " | ".join(cells) + " |")
    title = {"hippocampus": "MSD Hippocampus (MRI segmentation, Dice)",
             "adrenal": "AdrenalMNIST3D (classification, AUC)"}[report["benchmark"]]
    lines = [f"# {title}, {report['sites']} simulated sites", "",
             f"{report['note']}", "",
             f"{report['epochs']} epochs per arm; per-site columns: each site's own test cases; held-out: all "
             "sites' test cases together." + (" QUICK SMOKE RUN: the numbers mean nothing." if report["quick"] else ""),
             "", *rows, "", *[f"- {g}" for g in report["goals"]], ""]
    if report.get("skipped"):
        lines.insert(-2, f"- arms left out of this run (--skip): {', '.join(report['skipped'])}")
    if report["local_arms_sampled"]:
        lines.insert(-2, f"- local-only arms: a seeded sample of {len(report['local_arms'])} of the {report['sites']} sites")
    return "\n".join(lines)


def _drop(reference: float | None, value: float | None) -> float | None:
    """Relative drop of ``value`` below ``reference`` (negative: above it)."""
    return None if reference in (None, 0) or value is None else (reference - value) / reference


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def _personal_goal(name: str, arms: dict) -> str:
    """Issue 14's goal at each site: the personal model >= the global model and >= the local-only one."""
    metric, sites = arms[name]["metric"], arms[name]["sites"]
    below = []
    for site, m in sites.items():
        bars = [m.get(metric)] + ([arms[f"local-{site}"]["sites"][site].get(metric)] if f"local-{site}" in arms else [])
        personal = m.get(f"personal-{metric}")
        if personal is None or any(b is not None and personal < b for b in bars):
            below.append(site)
    compared = "its local-only and its global-model" if any(f"local-{s}" in arms for s in sites) else "its global-model"
    return (f"{name}: every site's personal {metric} >= {compared} {metric}: " + ("met" if not below else
            f"not met (below: {', '.join(below)})"))


def goals(report: dict) -> list[str]:
    """The issue's goals, each with the measured value and met / not met."""
    arms, out = report["arms"], []
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    if report["benchmark"] == "hippocampus":
        pooled = arms.get("pooled", {}).get("held_out", {}).get("dice")
        if "pooled" in arms:
            out.append(f"pooled held-out mean Dice {_f(pooled)} (goal >= 0.89): {met(pooled is not None and pooled >= 0.89)}")
        if "fedavg" in arms and "pooled" in arms:
            ratio = _ratio(arms["fedavg"]["held_out"].get("dice"), pooled)
            out.append(f"FedAvg / pooled held-out Dice = {_f(ratio)} (goal >= 0.98): {met(ratio is not None and ratio >= 0.98)}")
        fed = [a for a in arms if not a.startswith(("pooled", "local-"))]
        for name in fed:
            worse = [s for s in arms[name]["sites"] if f"local-{s}" in arms
                     and (arms[name]["sites"][s].get("dice") or 0) < (arms[f"local-{s}"]["sites"][s].get("dice") or 0)]
            out.append(f"{name}: every site's Dice >= its local-only Dice: {met(not worse)}"
                       + (f" (below: {', '.join(worse)})" if worse else ""))
            if "personal_mean" in arms[name]:
                out.append(_personal_goal(name, arms))
    else:
        fedavg = arms.get("fedavg", {}).get("held_out", {}).get("auc")
        if "fedavg" in arms:  # a run without the arm (--strategies) measures nothing against this goal
            out.append(f"FedAvg held-out AUC {_f(fedavg)} (goal >= 0.83 with 10 sites; MedMNIST v2 centralised 3D "
                       f"ResNets 0.827-0.839 on the official test split): {met(fedavg is not None and fedavg >= 0.83)}")
        dp = [a for a in arms if a.startswith("fedavg-dp") and a != DP_CONTROL]
        for name in dp:
            auc = arms[name]["held_out"].get("auc")
            drop = _drop(fedavg, auc)
            against = (f"relative AUC drop vs FedAvg without DP {_f(None if drop is None else 100 * drop, 1)} % "
                       f"(goal <= 5 %): {met(drop is not None and drop <= 0.05)}" if "fedavg" in arms else
                       f"AUC {_f(auc)}; the drop vs FedAvg without DP (goal <= 5 %) is not measured: no fedavg arm")
            line = f"{name}: {against}; epsilon spent (max over sites) {_f(arms[name].get('dp_epsilon_spent_max'), 2)}"
            if DP_CONTROL in arms:  # the DP arm's own recipe without DP: what DP-SGD itself costs
                control = arms[DP_CONTROL]["held_out"].get("auc")
                same = _drop(control, auc)
                line += (f"; the same recipe without DP ({DP_CONTROL}) has AUC {_f(control)}, a drop of "
                         f"{_f(None if same is None else 100 * same, 1)} % with DP")
            out.append(line)
    total = report["setup_seconds"] + sum(a["seconds"] for a in arms.values())
    if report["benchmark"] == "hippocampus":
        out.append(f"whole benchmark {total / 60:.1f} min with {report['torch_threads']} torch thread(s) (goal <= 45 min "
                   f"on 2 CPU cores; meaningful only on an idle machine): {met(total <= 45 * 60)}")
    else:
        peak = report["process_peak_rss_mb"]
        out.append(f"peak memory of the benchmark process {peak:.0f} MB at {report['sites']} sites (goal <= "
                   f"{PEAK_RSS_GOAL_MB} MB at 100 sites): {met(peak <= PEAK_RSS_GOAL_MB)}; whole benchmark {total / 60:.1f} min")
    return out
