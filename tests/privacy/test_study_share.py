"""A study's epsilon share: run config ``dp-study-epsilon``, validated at the edge, capped at the site."""

from __future__ import annotations

import math

import pytest

from app.config import ConfigError, parse_run_config
from privacy.settings import DEFAULT_STUDY_FRACTION, REFUSAL_CODES, study_share


def test_nothing_asked_is_a_quarter_of_the_lifetime_budget():
    assert DEFAULT_STUDY_FRACTION == 0.25
    assert study_share(None, 8.0) == 2.0 and study_share(0.0, 8.0) == 2.0


def test_what_is_asked_is_capped_by_the_lifetime_budget():
    assert study_share(0.5, 8.0) == 0.5
    assert study_share(20.0, 8.0) == 8.0


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "3"])
def test_a_bad_share_is_refused(bad):
    with pytest.raises(ValueError, match="dp-study-epsilon"):
        study_share(bad, 8.0)


@pytest.mark.parametrize("value", ["-0.5", "nan", "inf"])
def test_the_run_config_key_is_validated(value):
    with pytest.raises(ConfigError, match="dp-study-epsilon"):
        parse_run_config({"dp-study-epsilon": value})


def test_the_run_config_key_parses_and_defaults_to_zero():
    assert parse_run_config({}).dp_study_epsilon == 0.0
    assert parse_run_config({"dp-study-epsilon": "1.5"}).dp_study_epsilon == 1.5


def test_refusal_codes_are_plain_codes_the_server_can_count():
    for code in REFUSAL_CODES:
        assert code.startswith("privacy-") and code.replace("-", "").isalpha()
