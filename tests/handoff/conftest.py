"""Fixtures for the hand-off tests: a small demo site and a run directory with a random model."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.demo import write_demo_site

from .fixtures import save_random_model, write_run_config


@pytest.fixture(scope="session")
def demo_ct(tmp_path_factory) -> Path:
    """site-a (CT, stored LPS), size small: 54x48x22 voxels."""
    return write_demo_site(tmp_path_factory.mktemp("demo") / "site-a", "site-a", 3, task="segmentation", size="small")


@pytest.fixture(scope="session")
def demo_mr(tmp_path_factory) -> Path:
    """site-d (MR, stored with permuted axes PLS), size small."""
    return write_demo_site(tmp_path_factory.mktemp("demo") / "site-d", "site-d", 3, task="segmentation", size="small")


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory) -> Path:
    """A run directory: run_config.json (tiny UNet) and a random final_model.pt."""
    run_dir = tmp_path_factory.mktemp("runs") / "run-seg"
    write_run_config(run_dir)
    save_random_model(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def ct_case(demo_ct) -> Path:
    return sorted((demo_ct / "imagesTs").glob("*.nii.gz"))[0]
