"""The seven training methods: each one's defining invariants on tiny tensors, and that each one trains."""

from __future__ import annotations

import itertools
import re
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

import trainables
import trainables.catrs as catrs_module
from catrs.data import get_dataset
from catrs.errors import UserError
from catrs.models import create_model
from trainables.base import Batch, SoftLabelNeed, StepContext, frozen_eval, kl_to_target, project_l2
from trainables.catrs import (
    CatrsConfig,
    bottom_k_mean,
    catrs_loss,
    catrs_objective,
    pixel_mean,
    pixel_rms,
    restandardize,
    sample_k,
    worst_case_noise,
)
from trainables.consistency import consistency_terms
from trainables.macer import macer_margin
from trainables.smoothadv import smoothadv_attack
from trainables.smoothmix import mix_loss, mix_start, smoothmix_iterates

METHODS = ["catrs", "consistency", "gaussian", "macer", "smoothadv", "smoothmix", "stability"]


def tiny_batch(size: int = 8, classes: int = 10, confident: float = 0.82) -> Batch:
    torch.manual_seed(0)
    x, y = torch.rand(size, 1, 8, 8), torch.arange(size) % classes
    soft = torch.full((size, classes), (1 - confident) / (classes - 1))
    soft[torch.arange(size), y] = confident
    return Batch(x, y, torch.arange(size), soft)


def test_registry_has_the_seven_methods_and_names_them_on_error():
    assert trainables.names() == METHODS
    with pytest.raises(UserError, match="unknown training method 'trades'; choose one of: catrs, consistency"):
        trainables.get("trades")
    with pytest.raises(KeyError, match="valid: confidence_mask, eps_double_epoch, epsilon, lbd"):
        trainables.get("catrs").make_config({"lambda": 1.0})
    config = trainables.get("catrs").make_config({"lbd": "2.5", "num_noises": "8", "confidence_mask": "true"})
    assert (config.lbd, config.num_noises, config.confidence_mask) == (2.5, 8, True)


@pytest.mark.parametrize("name", METHODS)
def test_every_float_hyper_parameter_must_be_finite(name):
    method = trainables.get(name)
    floats = [f.name for f in fields(method.config_type) if f.type in ("float", float)]
    for field_name, value in itertools.product(floats, ("nan", "inf", float("-inf"))):
        with pytest.raises(ValueError, match=f"hyper-parameter {field_name} must be a finite number"):
            method.make_config({field_name: value})


# (method, overrides, what the refusal says): each method's domains (docs/methods.md's tables).
OUT_OF_DOMAIN = [
    ("catrs", {"lbd": 0.0}, "lbd must be positive, got 0.0"),
    ("catrs", {"epsilon": -0.5}, "epsilon must be at least 0"),
    ("catrs", {"num_noises": 0}, "num_noises must be at least 1"),
    ("catrs", {"num_steps": -1}, "num_steps must be at least 0"),
    ("catrs", {"sigma0": 0.0}, "sigma0 must be positive"),
    ("catrs", {"teacher_noises": 0}, "teacher_noises must be at least 1"),
    ("consistency", {"lbd": -1.0}, "lbd must be positive"),
    ("consistency", {"eta": -0.1}, "eta must be at least 0"),
    ("consistency", {"num_noises": 0}, "num_noises must be at least 1"),
    ("macer", {"lbd": 0.0}, "lbd must be positive"),
    ("macer", {"gamma": 0.0}, "gamma must be positive"),
    ("macer", {"beta": -16.0}, "beta must be positive"),
    ("macer", {"num_noises": 0}, "num_noises must be at least 1"),
    ("smoothadv", {"epsilon": -1.0}, "epsilon must be at least 0"),
    ("smoothadv", {"num_noises": 0}, "num_noises must be at least 1"),
    ("smoothadv", {"num_steps": -1}, "num_steps must be at least 0"),
    ("smoothadv", {"warmup": -1}, "warmup must be at least 0"),
    ("smoothmix", {"eta": -5.0}, "eta must be at least 0"),
    ("smoothmix", {"alpha": -1.0}, "alpha must be at least 0"),
    ("smoothmix", {"num_noises": 0}, "num_noises must be at least 1"),
    ("smoothmix", {"mix_step": -1}, "mix_step must be at least 0"),
    ("smoothmix", {"num_steps": 1, "mix_step": 2}, "mix_step must be at most num_steps (1), got 2"),
    ("stability", {"lbd": 0.0}, "lbd must be positive"),
    ("catrs", {"num_noises": 2.5}, "num_noises=2.5 is not a valid int"),
    ("catrs", {"num_noises": float("inf")}, "num_noises=inf is not a valid int"),
    ("catrs", {"lbd": True}, "lbd=True is not a valid float"),
]


@pytest.mark.parametrize("name,overrides,message", OUT_OF_DOMAIN, ids=[f"{c[0]}-{c[1]}" for c in OUT_OF_DOMAIN])
def test_hyper_parameters_out_of_their_domain_are_refused(name, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        trainables.get(name).make_config(overrides)


def test_the_edges_of_each_domain_are_accepted():
    """What the domains keep: the variants docs/methods.md names (no search, no warm-up, the clean mix start)."""
    trainables.get("catrs").make_config({"num_steps": 0, "epsilon": 0.0, "eps_double_epoch": -1})
    trainables.get("smoothadv").make_config({"num_steps": 0, "warmup": 0})
    trainables.get("smoothmix").make_config({"num_steps": 0, "mix_step": 0, "eta": 0.0})
    assert trainables.get("catrs").make_config({"num_noises": 4.0}).num_noises == 4


# --- CAT-RS ------------------------------------------------------------------------------------------------


def test_bottom_k_sums_exactly_the_k_smallest_losses_and_divides_by_m():
    losses = torch.tensor([[0.4, 0.1, 0.3, 0.2], [5.0, 1.0, 3.0, 2.0], [1.0, 1.0, 0.5, 9.0], [7.0, 6.0, 5.0, 4.0]])
    k = torch.tensor([1, 2, 3, 4])
    expected = [0.1 / 4, (1.0 + 2.0) / 4, (0.5 + 1.0 + 1.0) / 4, 22.0 / 4]
    torch.testing.assert_close(bottom_k_mean(losses, k), torch.tensor(expected))


def test_k_is_binomial_and_never_below_one():
    torch.manual_seed(0)
    assert sample_k(torch.zeros(1000), 4).min() == 1
    assert (sample_k(torch.ones(100), 4) == 4).all()
    draws = sample_k(torch.full((20_000,), 0.5), 4)
    # Bin(4, ½) clamped at 1: P(K=0)=1/16 moves to 1, so E[K] = 2 + 1/16.
    assert abs(draws.float().mean().item() - (2 + 1 / 16)) < 0.03
    assert set(draws.tolist()) == {1, 2, 3, 4}


def test_the_worst_case_term_counts_only_when_k_equals_m():
    torch.manual_seed(0)
    ce, kl = torch.rand(6, 4), torch.rand(6, 4)
    k = torch.tensor([1, 2, 3, 4, 4, 1])
    loss, low, high = catrs_objective(ce, kl, k, lbd=2.0)
    full = k == 4
    torch.testing.assert_close(loss[~full], low[~full])
    torch.testing.assert_close(loss[full], low[full] + 2.0 * kl[full].max(dim=1).values)
    torch.testing.assert_close(high, kl.max(dim=1).values)


def test_projection_keeps_each_sample_within_epsilon_and_leaves_the_inside_alone():
    torch.manual_seed(0)
    t = torch.randn(3, 5, 1, 8, 8) * torch.tensor([0.01, 1.0, 10.0])[:, None, None, None, None]
    projected = project_l2(t, 1.5)
    norms = projected.flatten(2).norm(dim=-1)
    assert (norms <= 1.5 + 1e-5).all()
    inside = t.flatten(2).norm(dim=-1) <= 1.5
    torch.testing.assert_close(projected[inside], t[inside])


def test_restandardize_restores_the_mean_and_rescales_by_s0_over_s():
    torch.manual_seed(0)
    original = 0.5 * torch.randn(4, 6, 3, 8, 8)
    moved = original + 0.3 * torch.randn_like(original) + 0.05
    out = restandardize(moved, pixel_mean(original), pixel_rms(original))
    torch.testing.assert_close(pixel_mean(out), pixel_mean(original), atol=1e-6, rtol=0)
    scale = pixel_rms(original) / pixel_rms(moved)
    torch.testing.assert_close(out - pixel_mean(original), (moved - pixel_mean(moved)) * scale)


def test_noise_search_projects_then_restandardizes_every_step_and_increases_the_kl(monkeypatch):
    torch.manual_seed(0)
    model = create_model("digits_cnn", 10)
    batch = tiny_batch(6)
    noises = 0.5 * torch.randn(4, 6, 1, 8, 8)
    epsilon, steps = 0.5, 4
    projections, standardizations = [], []

    def recording_project(t, radius):
        out = project_l2(t, radius)
        projections.append((t, out, radius))
        return out

    def recording_restandardize(noise, mean0, rms0):
        out = restandardize(noise, mean0, rms0)
        standardizations.append((noise, out))
        return out

    monkeypatch.setattr(catrs_module, "project_l2", recording_project)
    monkeypatch.setattr(catrs_module, "restandardize", recording_restandardize)
    searched = worst_case_noise(model, batch.x, noises, batch.soft_labels, epsilon, steps)

    assert len(projections) == len(standardizations) == steps
    for _, out, radius in projections:
        assert radius == epsilon and (out.flatten(2).norm(dim=-1) <= epsilon + 1e-5).all()
    for before, after in standardizations:
        torch.testing.assert_close(pixel_mean(after), pixel_mean(noises), atol=1e-6, rtol=0)
        expected = (before - pixel_mean(before)) * pixel_rms(noises) / pixel_rms(before) + pixel_mean(noises)
        torch.testing.assert_close(after, expected)
    # What comes back is the last re-standardised noise, not clipped back into the ε-ball afterwards.
    assert torch.equal(searched, standardizations[-1][1])

    def objective(n: torch.Tensor) -> torch.Tensor:
        return kl_to_target(
            batch.soft_labels, model.eval()((batch.x.unsqueeze(0) + n).flatten(0, 1)).view(4, 6, -1)
        ).sum()

    with torch.no_grad():
        assert objective(searched) > objective(noises)


def test_search_freezes_weights_and_restores_train_mode():
    model = create_model("digits_cnn", 10).train()
    batch = tiny_batch(4)
    worst_case_noise(model, batch.x, 0.5 * torch.randn(2, 4, 1, 8, 8), batch.soft_labels, 1.0, 2)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    with frozen_eval(model) as inner:
        assert not inner.training and not any(p.requires_grad for p in inner.parameters())


@pytest.mark.parametrize("confident,expected_full", [(1.0, 1.0), (0.0, 0.0)])
def test_confidence_mask_draws_k_from_the_soft_label(confident, expected_full):
    model = create_model("digits_cnn", 10)
    batch = tiny_batch(8, confident=confident)
    config = CatrsConfig(confidence_mask=True, num_steps=1)
    out = catrs_loss(model, batch, config, StepContext(sigma=0.5, epoch=0, num_classes=10))
    assert out.scalars["full_fraction"].item() == expected_full


def test_mean_softmax_variant_needs_no_teacher():
    method = trainables.get("catrs")
    config = method.make_config({"soft_labels": "mean_softmax"})
    assert method.soft_labels(config) is None
    assert method.soft_labels(method.make_config()) == SoftLabelNeed(sigma0=0.25, votes=10_000)
    batch = tiny_batch(4)
    out = catrs_loss(
        create_model("digits_cnn", 10),
        Batch(batch.x, batch.y, batch.index),
        config,
        StepContext(sigma=0.5, epoch=0, num_classes=10),
    )
    assert torch.isfinite(out.loss)


# --- baselines ---------------------------------------------------------------------------------------------


def test_smoothadv_stays_in_the_image_box_and_the_epsilon_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = create_model("digits_cnn", 10)
    batch = tiny_batch(6)
    noises = 0.25 * torch.randn(4, 6, 1, 8, 8)
    x_adv = smoothadv_attack(model, batch.x, batch.y, noises, epsilon=0.75, steps=5)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((x_adv - batch.x).flatten(1).norm(dim=1) <= 0.75 + 1e-5).all()

    def soft_loss(x):
        with torch.no_grad():
            probs = F.softmax(model.eval()((x.unsqueeze(0) + noises).flatten(0, 1)).view(4, 6, -1), -1).mean(0)
        return -torch.log(probs.gather(1, batch.y[:, None])).sum()

    assert soft_loss(x_adv) > soft_loss(batch.x)


def test_macer_margin_is_the_difference_of_inverse_normals():
    torch.manual_seed(0)
    logits = torch.randn(16, 5, 4) * 0.2
    q = F.softmax(16.0 * logits.double(), dim=-1).mean(0).numpy()
    y = torch.from_numpy(q.argmax(1))
    y[-1] = (y[-1] + 1) % 4  # one misclassified sample: outside the hinge
    xi, active = macer_margin(logits, y, beta=16.0, gamma=8.0)
    top = np.sort(q, axis=1)[:, ::-1]
    exact = norm.ppf(top[:, 0]) - norm.ppf(top[:, 1])
    expected = (q.argmax(1) == y.numpy()) & np.isfinite(exact) & (exact <= 8.0)
    assert active.tolist() == expected.tolist() == [True] * 4 + [False]
    np.testing.assert_allclose(xi.double().numpy()[expected], exact[expected], rtol=1e-4, atol=1e-4)


def test_consistency_terms_match_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5)
    kl, entropy = consistency_terms(logits)
    for b in range(4):
        probs = [F.softmax(logits[i, b], 0) for i in range(3)]
        mean = sum(probs) / 3
        direct_kl = sum((mean * (mean.log() - p.log())).sum() for p in probs) / 3
        assert kl[b].item() == pytest.approx(direct_kl.item(), rel=1e-5)
        assert entropy[b].item() == pytest.approx(-(mean * mean.log()).sum().item(), rel=1e-5)


def test_smoothmix_mix_term_matches_a_direct_computation():
    torch.manual_seed(0)
    logits_init, logits_mix = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    y, lam = torch.tensor([0, 1, 2, 0, 1]), torch.rand(5) / 2
    ours = mix_loss(logits_init, logits_mix, y, lam)
    for b in range(5):
        mean = (F.softmax(logits_init[0, b], 0) + F.softmax(logits_init[1, b], 0)) / 2
        target = (1 - lam[b]) * mean + lam[b] / 3
        for i in range(2):
            p = F.softmax(logits_mix[i, b], 0)
            direct = float(mean.argmax() == y[b]) * (target * (target.log() - p.log())).sum()
            assert ours[i, b].item() == pytest.approx(direct.item(), abs=1e-6)


def test_smoothmix_mix_start_is_pulled_into_the_warm_up_ball_around_x():
    x = torch.full((2, 1, 2, 2), 0.5)
    step = torch.tensor([[0.3, 0.4], [0.0, 0.0]])  # ℓ2 norm 0.5
    iterate = x + torch.stack([step, step / 10]).unsqueeze(1)  # sample 1 moved 0.5, sample 2 moved 0.05
    # Epoch 0 of a 10-epoch warm-up, α = 1, mix_step = 1: radius 0.1. Outside the ball: scaled onto it;
    # inside: unchanged.
    start = mix_start(x, iterate, 0.1 * 1.0 * 1)
    assert torch.allclose(start[0, 0], torch.tensor([[0.56, 0.58], [0.5, 0.5]]))
    assert torch.allclose(start[1], iterate[1])
    assert torch.equal(mix_start(x, iterate, 1.0), iterate)  # after the warm-up: the iterate itself
    assert torch.equal(mix_start(x, iterate, 0.0), x)  # mix_step 0: the clean input


def test_smoothmix_trains_on_the_warm_up_start_point():
    """With η = 0 the loss is the CE at x_init + δ_i: at epoch 0 that is the projected iterate, not the raw one."""
    from trainables.base import draw_noises, forward_copies
    from trainables.smoothmix import smoothmix_loss

    torch.manual_seed(0)
    model, batch = create_model("digits_cnn", 10), tiny_batch(4)
    config = trainables.get("smoothmix").make_config({"num_steps": 2, "alpha": 1.0, "mix_step": 1, "eta": 0.0})
    torch.manual_seed(1)
    loss = smoothmix_loss(model, batch, config, StepContext(sigma=0.25, epoch=0, num_classes=10)).loss
    torch.manual_seed(1)
    noises = draw_noises(batch.x, 0.25, config.num_noises)
    iterate = smoothmix_iterates(model, batch.x, batch.y, noises, 1.0, 2)[1]

    def ce_at(point):
        return F.cross_entropy(
            forward_copies(model, point.unsqueeze(0) + noises).flatten(0, 1), batch.y.repeat(config.num_noises)
        )

    assert loss.item() == pytest.approx(ce_at(mix_start(batch.x, iterate, 0.1)).item(), abs=1e-6)
    assert loss.item() != pytest.approx(ce_at(iterate).item(), abs=1e-6)  # what catrs trained on before


def test_smoothmix_iterates_start_clean_and_stay_in_the_box():
    model = create_model("digits_cnn", 10)
    batch = tiny_batch(4)
    iterates = smoothmix_iterates(model, batch.x, batch.y, 0.5 * torch.randn(2, 4, 1, 8, 8), alpha=1.0, steps=3)
    assert len(iterates) == 4 and torch.equal(iterates[0], batch.x)
    assert all(0 <= it.min() and it.max() <= 1 for it in iterates)
    assert not torch.equal(iterates[1], iterates[0])


# --- every method ------------------------------------------------------------------------------------------


def _small_config(name: str):
    method = trainables.get(name)
    cheap = {
        "smoothadv": {"num_steps": 2, "num_noises": 2, "warmup": 1},
        "macer": {"num_noises": 4},
        "catrs": {"num_steps": 2, "num_noises": 2},
        "smoothmix": {"num_steps": 2},
    }
    return method, method.make_config(cheap.get(name, {}))


@pytest.mark.parametrize("name", METHODS)
def test_one_optimizer_step_changes_the_weights(name):
    method, config = _small_config(name)
    torch.manual_seed(0)
    model = create_model("digits_cnn", 10).train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    output = method.loss(model, tiny_batch(8), config, StepContext(sigma=0.25, epoch=0, num_classes=10))
    output.loss.backward()
    optimizer.step()
    assert torch.isfinite(output.loss) and "accuracy" in output.scalars
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", METHODS)
def test_a_few_dozen_steps_on_a_fixed_batch_drive_the_loss_down(name):
    method, config = _small_config(name)
    torch.manual_seed(0)
    model = create_model("digits_cnn", 4).train()
    data = get_dataset("synthetic", "train")
    x = torch.stack([data[i][1] for i in range(32)])
    y = torch.tensor([data[i][2] for i in range(32)])
    soft = F.one_hot(y, 4).float() * 0.9 + 0.025
    batch = Batch(x, y, torch.arange(32), soft)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)  # no SGD plateau: 40 steps are enough for all
    losses = []
    for _ in range(40):  # epoch 20: past every warm-up, so the objective stays the same throughout
        output = method.loss(model, batch, config, StepContext(sigma=0.25, epoch=20, num_classes=4))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), [round(v, 3) for v in losses]


def test_macer_gradients_stay_finite_when_the_smoothed_classifier_saturates():
    model = create_model("digits_cnn", 10)
    with torch.no_grad():
        model[1][-1].bias.copy_(torch.tensor([60.0] + [0.0] * 9))  # q_top1 → 1 and Φ⁻¹ → ∞
    batch = tiny_batch(8)
    method = trainables.get("macer")
    output = method.loss(model, batch, method.make_config({"num_noises": 4}), StepContext(0.25, 0, 10))
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
