"""Differential privacy for fedimaging sites: Opacus DP-SGD with a lifetime, site-owned ledger.

torch + opacus only (never flwr or monai). Entry points: ``DPSiteSession`` (one per site per run),
``case_units`` (who a training set's steps protect), ``make_dp_compatible`` (same model surgery
on server and sites), ``PrivacyLedger`` and ``calibrate_noise_multiplier``; ``privacy.cli``
backs ``fedimaging privacy show`` and ``fedimaging privacy migrate``.
"""

from fedimaging.quiet import root_logging_kept

with root_logging_kept():  # opacus calls logging.basicConfig on import (every log line twice)
    import opacus  # noqa: F401

from privacy.accounting import epsilon_of
from privacy.calibrate import BudgetExhausted, calibrate_noise_multiplier, planned_steps
from privacy.engine import NotDPCompatible, is_dp_compatible, make_dp_compatible
from privacy.ledger import LedgerError, PrivacyLedger, default_delta
from privacy.session import (
    DEFAULT_STUDY_FRACTION,
    REFUSAL_CODES,
    DPSettings,
    DPSiteSession,
    StepResult,
    default_state_dir,
    study_share,
)
from privacy.units import case_units, training_case_names

__all__ = [
    "DEFAULT_STUDY_FRACTION", "REFUSAL_CODES", "BudgetExhausted", "DPSettings", "DPSiteSession", "LedgerError",
    "NotDPCompatible", "PrivacyLedger", "StepResult", "calibrate_noise_multiplier", "case_units", "default_delta",
    "default_state_dir", "epsilon_of", "is_dp_compatible", "make_dp_compatible", "planned_steps", "study_share",
    "training_case_names",
]
