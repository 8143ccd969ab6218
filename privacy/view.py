"""What ``fedimaging privacy show`` prints: a site ledger as a table or as JSON."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from privacy.accounting import epsilon_of
from privacy.ledger import PrivacyLedger


def _studies(ledger: PrivacyLedger, delta: float | None) -> dict[str, float | None]:
    runs = dict.fromkeys(r.run_id for r in ledger.releases)
    return {run: (epsilon_of(ledger.study_history(run), delta, ledger.mechanism) if delta else None) for run in runs}


def ledger_summary(ledger: PrivacyLedger, state_dir: Path, cases: Sequence[Sequence[str]] | None,
                   budget: float | None, delta: float | None, legacy: list[dict]) -> dict:
    """JSON-ready summary (``privacy show --json``); epsilons need a delta (None without one)."""
    current = None
    if cases is not None:
        spent = ledger.spent(cases, delta) if delta else None
        trained = sum(1 for c in cases if ledger.case_histories([c])[0])
        current = {
            "training_cases": len(cases), "cases_trained_before": trained, "epsilon_spent": spent,
            "epsilon_remaining": (max(0.0, budget - spent) if budget is not None and spent is not None else None),
        }
    return {
        "state_dir": str(state_dir), "ledger": str(ledger.path), "ledger_id": ledger.ledger_id,
        "mechanism": ledger.mechanism, "epsilon_budget": budget, "delta": delta,
        "epsilon_spent_worst_case": ledger.spent_anywhere(delta) if delta else None,
        "current_dataset": current,
        "studies": _studies(ledger, delta),
        "releases": [{"run_id": r.run_id, "rounds": r.rounds, "steps": r.steps, "noise_multiplier": r.noise_multiplier,
                      "sample_rate": r.sample_rate, "study_epsilon": r.study_epsilon, "open": r.open,
                      "units": len(ledger.unit_sets[r.units])} for r in ledger.releases],
        "migrated": ledger.migrated, "not_migrated": legacy,
    }


def format_ledger(ledger: PrivacyLedger, state_dir: Path, cases: Sequence[Sequence[str]] | None,
                  budget: float | None, delta: float | None, legacy: list[dict]) -> str:
    """Human-readable table: one line per release, each study's epsilon, then the totals."""
    s = ledger_summary(ledger, state_dir, cases, budget, delta, legacy)
    lines = [f"Privacy ledger {ledger.path}", f"ledger {ledger.ledger_id or '(none yet)'}  accountant {ledger.mechanism}"]
    header = f"{'study (run)':<32} {'rounds':>6} {'steps':>7} {'sigma':>9} {'q':>8} {'units':>6} {'share':>7}"
    lines += [header, "-" * len(header)]
    for r in s["releases"]:
        share = f"{r['study_epsilon']:.3f}" if r["study_epsilon"] is not None else "-"
        lines.append(f"{r['run_id'][:32]:<32} {'(open)' if r['open'] else r['rounds']:>6} {r['steps']:>7} "
                     f"{r['noise_multiplier']:>9.4f} {r['sample_rate']:>8.4f} {r['units']:>6} {share:>7}")
    if not s["releases"]:
        lines.append("(no DP training recorded)")
    lines.append("-" * len(header))
    for run, eps in s["studies"].items():
        lines.append(f"study {run}: epsilon {eps:.3f}" if eps is not None else f"study {run}: epsilon unknown (no delta)")
    budget_txt = f"{budget:.3f}" if budget is not None else "unknown"
    delta_txt = f"{delta:.3g}" if delta else "unknown"
    worst = s["epsilon_spent_worst_case"]
    lines.append(f"total steps {ledger.total_steps}; largest epsilon of any case or patient "
                 f"{worst:.3f} of {budget_txt} (delta {delta_txt})" if worst is not None else
                 f"total steps {ledger.total_steps}; epsilon unknown (no delta recorded)")
    cur = s["current_dataset"]
    if cur is not None:
        spent = f"{cur['epsilon_spent']:.3f}" if cur["epsilon_spent"] is not None else "unknown"
        lines.append(f"Current dataset: {cur['training_cases']} training cases ({cur['cases_trained_before']} "
                     f"trained with DP before), epsilon spent {spent} of {budget_txt}")
    for m in ledger.migrated:
        lines.append(f"migrated from version 1: {m.get('file')} ({m.get('steps')} steps, charged to {m.get('cases')} cases)")
    for old in legacy:
        lines.append(f"NOT MIGRATED (training refused until it is): {old['file']} ({old['steps']} steps); "
                     f"see 'fedimaging privacy migrate --help'")
    return "\n".join(lines)
