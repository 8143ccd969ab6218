"""Every message a ClientApp sends carries only model arrays, numbers and the site's public name.

Runs a real (tiny) study through the real ServerApp logic and ClientApp on an in-process grid
(no transport), captures every reply and inspects it: no file path, case name, image data or
any other text leaves a site.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from app.client_app import app as client_app
from app.config import parse_run_config
from app.server_app import run_study
from bench.local_grid import LocalGrid
from tasks import get_task

TINY = {
    "num-server-rounds": 1, "local-epochs": 1, "demo-size": "small", "spacing": "6,6,6",
    "roi-size": "16,16,16", "channels": "4,8,16", "crops-per-case": 1, "batch-size": 2,
    "local-baselines": True, "strategy": "scaffold", "optimizer": "sgd", "lr": 0.01,
}
SITE_KEYS = {"site-name", "refused-reason", "eval-dataset", "channel-names"}


class CapturingGrid(LocalGrid):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    raw = {**TINY, "home": str(home), "run-dir": str(home / "run")}
    grid = CapturingGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], raw)
    run_study(grid, raw, run_id=7)
    config = parse_run_config(raw)
    model = get_task(config.task, config.task_settings()).build_model()
    return grid.replies, home, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def test_replies_hold_only_model_arrays_numbers_and_site_names(captured):
    replies, home, model_shapes = captured
    assert len(replies) >= 3 * 4  # train, evaluate, local baselines, cross-site (+ unseen)
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
        content = reply.content
        assert set(content.keys()) <= {"arrays", "metrics", "site", "scaffold-delta-c"}
        for name, record in content.items():
            if isinstance(record, ArrayRecord):
                for key, array in record.items():
                    assert key in model_shapes, f"{name}: {key} is not a model parameter"
                    assert tuple(array.shape) == model_shapes[key]
            elif isinstance(record, MetricRecord):
                for key, value in record.items():
                    values = value if isinstance(value, list) else [value]
                    assert all(isinstance(v, (int, float)) for v in values), (key, value)
            elif isinstance(record, ConfigRecord):
                assert name == "site"
                assert set(record.keys()) <= SITE_KEYS
                assert record["site-name"] in {"site-a", "site-b", "site-c"}
                if "channel-names" in record:  # the pre-round-1 channel check: protocol names only
                    assert record["channel-names"] == ["CT"]
            else:
                pytest.fail(f"unexpected record type {type(record).__name__}")


def test_sites_describe_their_channels_before_round_one_and_nothing_else(captured):
    replies, _, _ = captured
    described = [r for r in replies if "channel-names" in r.content.get("site", {})]
    assert len(described) == 3  # one answer per site to the pre-round-1 channel check
    for reply in described:
        assert set(reply.content.keys()) == {"site", "metrics"}
        assert dict(reply.content["metrics"]) == {"num-channels": 1}


def test_no_path_case_name_or_text_in_any_reply(captured):
    replies, home, _ = captured
    texts = []
    for reply in replies:
        for record in reply.content.values():
            if isinstance(record, ConfigRecord):
                for value in record.values():
                    texts.extend(_strings(value))
    forbidden = [str(home), "/", "nii", "imagesTr", "labelsTr", "case-", "dataset.json", "DEMO"]
    # the sites' real case pseudonyms and the DICOM SeriesInstanceUIDs their data came from
    for dataset in home.rglob("dataset.json"):
        forbidden += sorted(set(re.findall(r"case-[0-9a-f]{6,}", dataset.read_text())))
    for mapping in home.rglob("private/mapping.json"):
        forbidden += sorted(set(re.findall(r"\d+(?:\.\d+){4,}", mapping.read_text())))
    assert len(forbidden) > 20  # the demo sites' names and UIDs were found
    for text in texts:
        for needle in forbidden:
            assert needle not in text, f"{needle!r} leaked in {text!r}"


def test_metrics_count_cases_not_batches(captured):
    replies, _, _ = captured
    train = [r for r in replies if "arrays" in r.content and "metrics" in r.content]
    assert train
    for reply in train:
        metrics = reply.content["metrics"]
        # small demo: 4 training cases per site; 4 cases / batch 2 = 2 steps per epoch
        assert metrics["num-examples"] == 4
        assert np.isfinite(metrics["loss"])


def test_preprocessed_cache_stays_in_state_dir_never_in_a_dataset_folder_or_reply(captured):
    """Each site's cache is under its state-dir; datasets hold no cache file; no reply names an entry."""
    import json

    replies, home, _ = captured
    entries = sorted(home.glob("site-state/*/cache/preprocessed/*.pt"))
    assert {p.parts[-4] for p in entries} == {"site-a", "site-b", "site-c"}  # every site wrote its own
    datasets = {p.parent for p in home.rglob("dataset.json")}
    assert datasets
    for folder in datasets:
        inside = [p for p in folder.rglob("*") if p.suffix == ".pt" or "cache" in p.name or "file-hashes" in p.name]
        assert not inside, f"cache files inside the dataset folder {folder}: {inside}"
    secrets = {p.stem for p in entries}  # entry keys
    for memo in home.glob("site-state/*/cache/preprocessed/file-hashes.json"):
        for stamp in json.loads(memo.read_text()).values():
            secrets.add(stamp[-1])  # content hashes of the sites' images
    texts = []
    for reply in replies:
        for record in reply.content.values():
            if isinstance(record, ConfigRecord):
                for value in record.values():
                    texts.extend(_strings(value))
            elif isinstance(record, MetricRecord):
                texts.extend(str(k) for k in record.keys())
    assert len(secrets) > len(entries)
    for text in texts:
        assert not any(secret in text for secret in secrets), f"a cache key or content hash in {text!r}"
