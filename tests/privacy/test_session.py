"""DPSiteSession: per-sample clipping matches a naive loop, noise is applied, ledger and refusals work."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.engine import make_dp_compatible
from privacy.ledger import PrivacyLedger
from privacy.session import DEFAULT_STUDY_FRACTION, DPSettings, DPSiteSession
from privacy.units import unit_key

DELTA = 1e-5
N, SIZE = 12, 8
CASES = [(unit_key("case", f"case-{i}"),) for i in range(N)]
_dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")


def per_sample_loss(logits, label):
    """Dice + CE, one value per sample (no term mixes samples)."""
    dice = _dice(logits, label).flatten(1).mean(1)
    ce = F.cross_entropy(logits, label[:, 0].long(), reduction="none").flatten(1).mean(1)
    return dice + ce


def tiny_unet(seed=0, act="PRELU", norm=("INSTANCE", {"affine": True})):
    torch.manual_seed(seed)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(2, 4), strides=(2,),
               num_res_units=1, act=act, norm=norm)
    return make_dp_compatible(net)


def tiny_convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 2, 1))


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 1, SIZE, SIZE, SIZE, generator=g)
    y = torch.randint(0, 2, (N, 1, SIZE, SIZE, SIZE), generator=g)
    return x, y


def make_session(model, state_dir, *, epsilon=8.0, rounds=2, epochs=1, run_id="run-1", mode="functorch",
                 clip=1.0, noise_seed=7, lr=0.05, study=None, cases=CASES):
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    settings = DPSettings(epsilon=epsilon, delta=DELTA, max_grad_norm=clip, grad_sample_mode=mode)
    return DPSiteSession(model=model, optimizer=opt, train_loader=loader, settings=settings,
                         state_dir=state_dir, cases=cases, run_id=run_id, rounds=rounds,
                         local_epochs=epochs, seed=0, noise_seed=noise_seed, study_epsilon=study)


def naive_clipped_mean(model, x, y, clip, expected_batch_size):
    """Reference: one backward per sample, clip each gradient, sum, divide by expected batch size."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        loss = per_sample_loss(model(x[i:i + 1]), y[i:i + 1])[0]
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    return [t / expected_batch_size for t in total]


@pytest.mark.parametrize(
    "mode,build",
    [("functorch", tiny_unet), ("hooks", tiny_unet), ("functorch", lambda: tiny_unet(act="RELU", norm="INSTANCE")),
     ("ew", tiny_convnet)],
)
def test_clipped_gradient_matches_naive_per_sample_loop(tmp_path, mode, build):
    model = build()
    reference_model = copy.deepcopy(model)
    session = make_session(model, tmp_path, mode=mode, clip=0.05)
    session.optimizer.noise_multiplier = 0.0  # isolate clipping from noise
    assert session.begin_round() is None
    x, y = data(seed=3)
    xb, yb = x[:3], y[:3]
    expected = naive_clipped_mean(reference_model, xb, yb, 0.05, session.optimizer.expected_batch_size)
    session.step(xb, yb, per_sample_loss)
    got = [p.grad for p in session.module.parameters() if p.requires_grad]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # clipping was active (otherwise this would not test it)
    assert session.optimizer.max_grad_norm == 0.05


def test_noise_is_applied_with_the_calibrated_scale(tmp_path):
    model = tiny_unet()
    reference_model = copy.deepcopy(model)
    session = make_session(model, tmp_path, epsilon=2.0, clip=0.5)
    sigma = session.noise_multiplier
    assert sigma > 0.5
    assert session.begin_round() is None
    x, y = data(seed=3)
    clean = naive_clipped_mean(reference_model, x[:4], y[:4], 0.5, session.optimizer.expected_batch_size)
    session.step(x[:4], y[:4], per_sample_loss)
    noise = torch.cat([(p.grad - c).flatten() for p, c in zip(session.module.parameters(), clean)])
    expected_std = sigma * 0.5 / session.optimizer.expected_batch_size
    assert noise.numel() > 200
    assert noise.std().item() == pytest.approx(expected_std, rel=0.25)
    assert abs(noise.mean().item()) < 4 * expected_std / noise.numel() ** 0.5


def test_round_reports_lifetime_epsilon_matching_an_independent_accountant(tmp_path):
    session = make_session(tiny_unet(), tmp_path, epsilon=8.0, rounds=2, epochs=1, study=8.0)
    steps_per_round = session.steps_per_epoch
    assert session.begin_round() is None
    for xb, yb in session.train_loader:
        session.step(xb, yb, per_sample_loss)
    metrics = session.end_round()
    acc = RDPAccountant()
    for _ in range(steps_per_round):
        acc.step(noise_multiplier=session.noise_multiplier, sample_rate=session.sample_rate)
    assert metrics["dp-steps"] == steps_per_round
    assert metrics["dp-epsilon-spent"] == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)
    assert metrics["dp-sample-rate"] == pytest.approx(4 / N)
    assert metrics["dp-noise-multiplier"] == session.noise_multiplier

    # a new process (restart) and a new run on the same dataset continue the same ledger
    second = make_session(tiny_unet(), tmp_path, epsilon=8.0, rounds=2, epochs=1, run_id="run-2", study=8.0)
    assert second.noise_multiplier > session.noise_multiplier  # less budget left for its steps
    assert second.spent() == pytest.approx(metrics["dp-epsilon-spent"], rel=1e-12)
    assert second.begin_round() is None
    for xb, yb in second.train_loader:
        second.step(xb, yb, per_sample_loss)
    m2 = second.end_round()
    for _ in range(steps_per_round):
        acc.step(noise_multiplier=second.noise_multiplier, sample_rate=second.sample_rate)
    assert m2["dp-epsilon-spent"] == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)
    assert m2["dp-epsilon-spent"] <= 8.0
    ledger = PrivacyLedger.load(tmp_path)
    assert [r.run_id for r in ledger.releases] == ["run-1", "run-2"]


def test_budget_exhaustion_refuses(tmp_path):
    session = make_session(tiny_convnet(), tmp_path, epsilon=3.0, rounds=2, epochs=1, mode="ew", study=3.0)
    for _ in range(2):
        assert session.begin_round() is None
        for xb, yb in session.train_loader:
            session.step(xb, yb, per_sample_loss)
        metrics = session.end_round()
    assert metrics["dp-epsilon-spent"] <= 3.0
    assert metrics["dp-epsilon-spent"] > 3.0 - 0.011  # calibrated: the plan used the budget
    assert session.begin_round() == "privacy-budget-exhausted"
    assert "lifetime" in session.refusal_detail
    with pytest.raises(RuntimeError, match="begin_round"):
        x, y = data()
        session.step(x[:2], y[:2], per_sample_loss)
    # a new run on the same dataset is refused from the start
    later = make_session(tiny_convnet(), tmp_path, epsilon=3.0, rounds=5, run_id="run-9", mode="ew", study=1.0)
    assert later.refusal == "privacy-budget-exhausted" and later.begin_round() == later.refusal
    assert PrivacyLedger.load(tmp_path).total_steps == 2 * session.steps_per_epoch


def test_steps_beyond_the_reserved_round_are_refused(tmp_path):
    session = make_session(tiny_convnet(), tmp_path, mode="ew")
    assert session.begin_round() is None
    x, y = data()
    for _ in range(session.steps_per_epoch):
        session.step(x[:2], y[:2], per_sample_loss)
    with pytest.raises(RuntimeError, match="granted"):
        session.step(x[:2], y[:2], per_sample_loss)
    session.end_round()


def test_empty_poisson_batch_still_takes_a_noisy_step(tmp_path):
    session = make_session(tiny_convnet(), tmp_path, mode="ew")
    before = [p.detach().clone() for p in session.module.parameters()]
    assert session.begin_round() is None
    result = session.step(torch.empty(0, 1, SIZE, SIZE, SIZE), torch.empty(0, 1, SIZE, SIZE, SIZE), per_sample_loss)
    assert result.num_samples == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, session.module.parameters()))
    assert session.end_round()["dp-steps"] == 1


def test_is_empty_batch_handles_loader_structures():
    empty = torch.empty(0, 1, 2)
    full = torch.zeros(2, 1, 2)
    assert DPSiteSession.is_empty_batch(empty)
    assert DPSiteSession.is_empty_batch({"image": empty, "label": empty})
    assert DPSiteSession.is_empty_batch([empty, empty])
    assert DPSiteSession.is_empty_batch([])
    assert not DPSiteSession.is_empty_batch({"image": full, "label": full, "name": ["a", "b"]})
    assert not DPSiteSession.is_empty_batch((full, full))


def test_global_weights_load_into_the_wrapped_model_and_training_is_seeded(tmp_path):
    def one_round(state_dir, global_sd):
        session = make_session(tiny_unet(seed=1), state_dir)
        session.module.load_state_dict(global_sd)
        for p, q in zip(session.module.parameters(), global_sd.values()):
            assert torch.equal(p, q)
        assert session.optimizer.params[0] is next(session.module.parameters())
        assert session.begin_round() is None
        for xb, yb in session.train_loader:
            session.step(xb, yb, per_sample_loss)
        session.end_round()
        return {k: v.clone() for k, v in session.module.state_dict().items()}

    global_sd = tiny_unet(seed=2).state_dict()
    a = one_round(tmp_path / "a", global_sd)
    b = one_round(tmp_path / "b", global_sd)
    assert list(a) == list(global_sd)  # plain keys, no Opacus "_module." prefix
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], global_sd[k]) for k in a)


def test_per_sample_loss_must_return_one_value_per_sample(tmp_path):
    session = make_session(tiny_convnet(), tmp_path, mode="ew")
    assert session.begin_round() is None
    x, y = data()
    with pytest.raises(ValueError, match="one loss per sample"):
        session.step(x[:3], y[:3], lambda out, t: per_sample_loss(out, t).mean())


def test_settings_from_node_config():
    assert DPSettings.from_node_config({}, 20) is None
    s = DPSettings.from_node_config({"dp-epsilon": "8"}, 20)
    assert (s.epsilon, s.delta, s.max_grad_norm) == (8.0, 1e-5, 1.0)
    s = DPSettings.from_node_config({"dp-epsilon": 4, "dp-delta": 1e-6, "dp-max-grad-norm": 0.5}, 20)
    assert (s.epsilon, s.delta, s.max_grad_norm) == (4.0, 1e-6, 0.5)
    assert DPSettings.from_node_config({"dp-epsilon": 1}, 10**6).delta == pytest.approx(1e-7)
    with pytest.raises(ValueError, match="1/N"):
        DPSettings.from_node_config({"dp-epsilon": 1, "dp-delta": 0.1}, 20)
    with pytest.raises(ValueError, match="dp-epsilon"):
        DPSettings.from_node_config({"dp-epsilon": "lots"}, 20)
    with pytest.raises(ValueError, match="dp-epsilon"):
        DPSettings.from_node_config({"dp-epsilon": -1}, 20)


def test_an_empty_first_poisson_batch_of_dictionary_data_is_a_noise_only_step(tmp_path):
    """MONAI-style dict samples: Opacus cannot guess an empty batch's structure from dataset[0]."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from privacy import DPSettings, DPSiteSession

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return [{"image": torch.full((1, 3), float(i)), "label": torch.tensor([i % 2])}]

    def collate(items):
        flat = [d for item in items for d in item]
        return {"image": torch.stack([d["image"] for d in flat]), "label": torch.stack([d["label"] for d in flat])}

    model = nn.Linear(3, 2)
    session = DPSiteSession(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=DataLoader(Dicts(), batch_size=2, collate_fn=collate),
        settings=DPSettings(epsilon=8.0, delta=1e-5), state_dir=tmp_path, cases=CASES[:4], run_id="r",
        rounds=1, local_epochs=1, noise_seed=1,
    )
    assert session.train_loader.collate_fn([]) == []  # first batch empty: recognisable, no crash
    assert session.is_empty_batch([])


def _train_all_rounds(session, rounds):
    for _ in range(rounds):
        assert session.begin_round() is None, session.refusal_detail
        for xb, yb in session.train_loader:
            session.step(xb, yb, per_sample_loss)
        metrics = session.end_round()
    return metrics


def test_a_study_that_asks_for_nothing_spends_a_quarter_of_the_lifetime_budget(tmp_path):
    session = make_session(tiny_convnet(), tmp_path, epsilon=8.0, rounds=2, mode="ew")
    metrics = _train_all_rounds(session, 2)
    share = DEFAULT_STUDY_FRACTION * 8.0
    assert metrics["dp-study-epsilon"] == share
    assert share - 0.011 < metrics["dp-study-epsilon-spent"] <= share  # calibrated to the share, not to 8
    assert metrics["dp-epsilon-spent"] == pytest.approx(metrics["dp-study-epsilon-spent"], rel=1e-12)


def test_two_studies_in_a_row_both_train_and_the_second_is_capped_by_what_is_left(tmp_path):
    """Issue 19 item 3: a smoke test no longer spends a site's whole lifetime budget."""
    first = make_session(tiny_convnet(), tmp_path, epsilon=4.0, rounds=2, mode="ew", run_id="smoke", study=1.0)
    m1 = _train_all_rounds(first, 2)
    assert 0.98 < m1["dp-study-epsilon-spent"] <= 1.0 and m1["dp-epsilon-spent"] <= 1.0
    second = make_session(tiny_convnet(), tmp_path, epsilon=4.0, rounds=2, mode="ew", run_id="study", study=2.0)
    m2 = _train_all_rounds(second, 2)
    assert 1.98 < m2["dp-study-epsilon-spent"] <= 2.0  # its own share, in full
    assert 2.0 < m2["dp-epsilon-spent"] < 3.0  # RDP composes sub-additively: less than 1 + 2
    acc = RDPAccountant()
    acc.history = [(first.noise_multiplier, first.sample_rate, 2 * first.steps_per_epoch),
                   (second.noise_multiplier, second.sample_rate, 2 * second.steps_per_epoch)]
    assert m2["dp-epsilon-spent"] == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)
    # a study asking for more than is left gets what is left: the lifetime budget binds
    big = make_session(tiny_convnet(), tmp_path, epsilon=4.0, rounds=1, mode="ew", run_id="big", study=4.0)
    m3 = _train_all_rounds(big, 1)
    assert 4.0 - 0.011 < m3["dp-epsilon-spent"] <= 4.0 and m3["dp-study-epsilon-spent"] < 3.9
    # then nothing is left, and the site says so with a reason code
    third = make_session(tiny_convnet(), tmp_path, epsilon=4.0, rounds=1, mode="ew", run_id="third", study=1.0)
    assert third.begin_round() == "privacy-budget-exhausted"


def test_new_cases_do_not_lift_the_spend_of_the_old_ones(tmp_path):
    first = make_session(tiny_convnet(), tmp_path, epsilon=4.0, rounds=1, mode="ew", run_id="a", study=4.0)
    spent = _train_all_rounds(first, 1)["dp-epsilon-spent"]
    swapped = CASES[:6] + [(unit_key("case", f"new-{i}"),) for i in range(6)]  # half new patients
    later = make_session(tiny_convnet(), tmp_path, epsilon=4.0, rounds=1, mode="ew", run_id="b", study=4.0,
                         cases=swapped)
    assert later.spent() == pytest.approx(spent, rel=1e-12)
    assert later.refusal == "privacy-budget-exhausted"


def test_a_study_resumed_in_a_new_process_counts_its_earlier_rounds(tmp_path):
    first = make_session(tiny_convnet(), tmp_path, epsilon=8.0, rounds=2, mode="ew", run_id="s", study=1.0)
    _train_all_rounds(first, 2)
    resumed = make_session(tiny_convnet(), tmp_path, epsilon=8.0, rounds=1, mode="ew", run_id="s", study=1.0)
    assert resumed.refusal == "privacy-study-share-spent"


def test_cases_must_match_the_training_samples(tmp_path):
    with pytest.raises(ValueError, match="one per case"):
        make_session(tiny_convnet(), tmp_path, mode="ew", cases=CASES[:5])
