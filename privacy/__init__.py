"""Differential privacy for fedimaging sites: Opacus DP-SGD with a lifetime, site-owned ledger.

torch + opacus only (never flwr or monai). Entry points: ``DPSiteSession`` (one per site per run),
``make_dp_compatible`` (same model surgery on server and sites), ``PrivacyLedger`` and
``calibrate_noise_multiplier``; ``privacy.cli.show_main`` backs ``fedimaging privacy show``.
"""

from fedimaging.quiet import root_logging_kept

with root_logging_kept():  # opacus calls logging.basicConfig on import (every log line twice)
    import opacus  # noqa: F401

from privacy.calibrate import BudgetExhausted, calibrate_noise_multiplier, planned_steps
from privacy.engine import NotDPCompatible, is_dp_compatible, make_dp_compatible
from privacy.ledger import (
    LedgerError,
    PrivacyLedger,
    dataset_id_for,
    dataset_id_from_training_list,
    default_delta,
    format_ledger,
)
from privacy.session import DPSettings, DPSiteSession, StepResult, default_state_dir

__all__ = [
    "BudgetExhausted", "DPSettings", "DPSiteSession", "LedgerError", "NotDPCompatible", "PrivacyLedger",
    "StepResult", "calibrate_noise_multiplier", "dataset_id_for", "dataset_id_from_training_list",
    "default_delta", "default_state_dir", "format_ledger", "is_dp_compatible", "make_dp_compatible",
    "planned_steps",
]
