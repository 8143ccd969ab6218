"""Every message a ClientApp sends carries only model arrays, numbers and the site's public name.

Runs a real (tiny) study through the real ServerApp logic and ClientApp on an in-process grid
(no transport), captures every reply and inspects it: no file path, case name, image data or
any other text leaves a site.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from app.client_app import app as client_app
from app.config import parse_run_config
from app.server_app import run_study
from tests.app.grids import CapturingGrid
from tasks import get_task

TINY = {
    "num-server-rounds": 1, "local-epochs": 1, "demo-size": "small", "spacing": "6,6,6",
    "roi-size": "16,16,16", "channels": "4,8,16", "crops-per-case": 1, "batch-size": 2,
    "local-baselines": True, "strategy": "scaffold", "optimizer": "sgd", "lr": 0.01,
    "personalization": "ditto",  # each site also trains a personal model, which must never leave it
}
SITE_KEYS = {"site-name", "refused-reason", "eval-dataset", "channel-names"}
README = Path(__file__).resolve().parents[2] / "README.md"
CONSOLE: dict[str, str] = {}  # what the captured study printed
SENT: list = []  # what the captured study's server sent to the sites


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    raw = {**TINY, "home": str(home), "run-dir": str(home / "run")}
    grid = CapturingGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], raw)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_study(grid, raw, run_id=7)
    CONSOLE["stdout"] = out.getvalue()
    config = parse_run_config(raw)
    model = get_task(config.task, config.task_settings()).build_model()
    SENT[:] = grid.sent
    return grid.replies, home, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _reply_texts(replies, metric_names: bool = False) -> list[str]:
    """Every string in the replies' config records (and, with ``metric_names``, every metric name)."""
    texts = []
    for reply in replies:
        for record in reply.content.values():
            if isinstance(record, ConfigRecord):
                for value in record.values():
                    texts.extend(_strings(value))
            elif metric_names and isinstance(record, MetricRecord):
                texts.extend(str(k) for k in record.keys())
    return texts


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


def test_personal_models_stay_at_their_site(captured):
    from fedimaging.weights import load_tensors

    replies, home, model_shapes = captured
    personal = sorted(home.rglob("personal-round-*.pt"))
    assert len(personal) == 3  # one per site, in its state-dir (1 round)

    def arrays(messages):
        return [array.numpy() for m in messages for record in m.content.values()
                if isinstance(record, ArrayRecord) for array in record.values()]

    sent, received = arrays(replies), arrays(SENT)
    moved = 0
    for path in personal:
        state = load_tensors(path)
        assert {k: tuple(v.shape) for k, v in state.items()} == model_shapes
        for name, tensor in state.items():
            value = tensor.numpy()
            # a tensor training left (up to rounding) as the server sent it tells nothing: a conv bias
            # before a norm layer has a zero gradient, and rounds alike in the global update
            if tensor.dtype.is_floating_point and not any(a.shape == value.shape and np.allclose(a, value, rtol=1e-4)
                                                          for a in received):
                moved += 1
                assert not any(a.shape == value.shape and np.array_equal(a, value) for a in sent), \
                    f"{path.parent.name}: personal {name} was sent"
    assert moved > 3 * len(model_shapes) // 2  # most personal tensors were trained away from the global model
    evaluated = [r.content["metrics"] for r in replies
                 if "arrays" not in r.content and "personal-dice" in r.content.get("metrics", {})]
    assert len(evaluated) >= 3  # every site reports its personal model beside the global one
    assert all(0 <= m["personal-dice"] <= 1 for m in evaluated)


def test_sites_describe_their_channels_before_round_one_and_nothing_else(captured):
    replies, _, _ = captured
    described = [r for r in replies if "channel-names" in r.content.get("site", {})]
    assert len(described) == 3  # one answer per site to the pre-round-1 channel check
    for reply in described:
        assert set(reply.content.keys()) == {"site", "metrics"}
        assert dict(reply.content["metrics"]) == {"num-channels": 1}


def test_no_path_case_name_or_text_in_any_reply(captured):
    replies, home, _ = captured
    texts = _reply_texts(replies)
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
    texts = _reply_texts(replies, metric_names=True)
    assert len(secrets) > len(entries)
    for text in texts:
        assert not any(secret in text for secret in secrets), f"a cache key or content hash in {text!r}"


@pytest.fixture(scope="module")
def failing(captured, tmp_path_factory):
    """A study whose sites fail in three ways: a label that is not gzip, no dataset, a bad dataset.json."""
    import logging
    import shutil

    _, home, _ = captured
    good = next(p.parent for p in sorted(home.rglob("dataset.json")) if "site-a" in str(p))
    root = tmp_path_factory.mktemp("failing")
    sites = root / "hospital-data"
    shutil.copytree(good, sites / "site-0")
    shutil.copytree(good, sites / "site-1")
    label = sorted((sites / "site-1" / "labelsTr").iterdir())[0]
    label.write_bytes(b"this is not a gzip file")  # nibabel raises, not DatasetError
    (sites / "site-2").mkdir()
    (sites / "site-2" / "dataset.json").write_text('{"training": [{"image": "/etc/passwd"}]}')
    raw = {**TINY, "local-baselines": False, "home": str(root), "run-dir": str(root / "run"),
           "data-path-template": str(sites / "{site}"), "strategy": "fedavg"}
    grid = CapturingGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], raw)
    handler = _ListHandler()
    logger = logging.getLogger("fedimaging.site")
    logger.addHandler(handler)
    try:
        run_study(grid, raw, run_id=8)
    finally:
        logger.removeHandler(handler)
    return grid.replies, root, label, handler.text()


class _ListHandler(__import__("logging").Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))

    def text(self):
        return "\n".join(self.lines)


def test_a_failing_site_reports_a_reason_code_and_no_path(failing):
    import json

    from app.site_failures import CODES, refusal_reason

    replies, root, label, _ = failing
    allowed = {refusal_reason(code) for code in CODES}
    reasons = []
    for reply in replies:
        assert not reply.has_error(), reply.error.reason  # nothing escapes as Flower's error text
        site = reply.content.config_records.get("site")
        if site is not None and "refused-reason" in site:
            reasons.append(site["refused-reason"])
            assert site["refused-reason"] in allowed
    # site-1's non-gzip label (the loader's checks read it first) and site-2's dataset.json
    assert set(reasons) == {refusal_reason("dataset-invalid")}
    # what the server stored
    lines = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    excluded = {site: reason for line in lines for site, reason in line["excluded"].items()}
    assert set(excluded) == {"site-1", "site-2"}
    for reason in excluded.values():
        assert str(root) not in reason and "/" not in reason and label.name not in reason
    assert lines[0]["sites"]["site-0"]["num-examples"] == 4  # the good site still trained


def test_failure_codes_come_from_the_exception_class_only():
    from nibabel.filebasedimages import ImageFileError

    from app.config_values import ConfigError
    from app.site_failures import failure_code
    from data_prep.site_dataset import DatasetError

    secret = "/data/site-a/imagesTr/case-1234_0000.nii.gz"
    assert failure_code(DatasetError(secret)) == "dataset-invalid"
    assert failure_code(ImageFileError(secret)) == "dataset-unreadable"
    assert failure_code(OSError(5, "I/O error", secret)) == "dataset-unreadable"
    assert failure_code(ConfigError(secret)) == "site-config-invalid"
    assert failure_code(MemoryError()) == "out-of-memory"
    assert failure_code(RuntimeError(secret)) == "internal-error"


def test_a_failing_site_logs_the_full_error_at_the_site(failing):
    _, root, label, site_log = failing
    assert label.name in site_log  # the operator can find the file
    assert "Traceback" in site_log and "site-2" in site_log


def _readme_console_block() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### What you see"):]
    return section.split("```\n", 2)[1].splitlines()


def _shape(line: str) -> str:
    """A console line with its numbers and paths replaced: what must match between runs."""
    line = re.sub(r"(Run directory|Report): .*", r"\1: PATH", line)
    return " ".join(re.sub(r"-?\d+(\.\d+)?", "N", line).split())


def _column_ends(line: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\S+", line)]


def _without_personal_column(lines: list[str]) -> list[str]:
    """The captured study is personalized (ditto); the README shows a default run, which has no
    trailing ``personal Dice`` column: cut the table's lines where that column begins."""
    title = next((line for line in lines if line.startswith("round ")), "")
    if not title.endswith("  personal Dice"):
        return lines
    width = len(title) - len("  personal Dice")
    table = re.compile(r"round |-+$|\s+\d+\s")
    return [line[:width].rstrip() if table.match(line) else line for line in lines]


def test_the_readme_shows_what_a_real_run_prints(captured):
    real = _without_personal_column(CONSOLE["stdout"].splitlines())
    shown = [line for line in _readme_console_block() if line.strip() != "..."]
    assert shown[1:3] == real[1:3]  # column titles and rule, character for character
    real_rows = [line for line in real if re.match(r"\s+\d+\s", line)]
    shown_rows = [line for line in shown if re.match(r"\s+\d+\s", line)]
    assert real_rows and shown_rows
    for row in shown_rows:  # right-aligned columns end where the real ones do
        assert _column_ends(row) == _column_ends(real_rows[0]), row
        assert _shape(row) == _shape(real_rows[0]), row
    # the other lines, in order: run directory, (table), final result, report, run directory
    others = lambda lines: [_shape(x) for x in lines if not re.match(r"\s+\d+\s|round |-+$", x)]  # noqa: E731
    assert others(shown) == others(real)
