"""The STXD losses and the d_eff diagnostic on tiny tensors whose values can be checked by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stxd_train.distill import (
    correlation_loss,
    effective_dimension,
    feature_mse,
    quality_weights,
    response_loss,
    temporal_loss,
)

# ---------------------------------------------------------------- correlation


def _features(n: int = 256, d: int = 6, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix + 3.0


def test_correlation_of_features_with_themselves() -> None:
    f = _features()
    assert correlation_loss(f, f.clone(), 0.0).item() == pytest.approx(0.0, abs=1e-8)
    corr = np.corrcoef(f.numpy(), rowvar=False)
    off_diag = float((corr**2).sum() - (np.diag(corr) ** 2).sum())
    assert off_diag > 0.1
    for lam in (0.005, 0.5, 2.0):
        assert correlation_loss(f, f.clone(), lam).item() == pytest.approx(lam * off_diag, rel=1e-5, abs=1e-8)


def test_correlation_standardisation_and_permutation() -> None:
    f = _features()
    g = f + 0.1 * _features(seed=1)
    base = correlation_loss(f, g, 0.005)
    scale = torch.tensor([2.0, 0.5, 7.0, 1.0, 3.0, 0.1], dtype=torch.float64)
    shift = torch.tensor([1.0, -4.0, 0.0, 9.0, 2.0, -1.0], dtype=torch.float64)
    assert correlation_loss(f, g * scale + shift, 0.005).item() == pytest.approx(base.item(), rel=1e-5)
    permuted = correlation_loss(f, g[:, [1, 2, 3, 4, 5, 0]], 0.005)
    assert permuted.item() > base.item() + 1.0


def test_correlation_hand_computed_2d() -> None:
    # f has orthogonal standardised columns a, b; g = [a, 3·(a + b)/√2 + 5], so after standardisation
    # C = [[1, 1/√2], [0, 1/√2]] and L = (1 − 1/√2)² + λ·(1/2).
    a = [1.0, -1.0, 1.0, -1.0]
    b = [1.0, 1.0, -1.0, -1.0]
    r2 = math.sqrt(2.0)
    f = torch.tensor([a, b], dtype=torch.float64).T
    g = torch.tensor([a, [3.0 * r2 + 5.0, 5.0, 5.0, -3.0 * r2 + 5.0]], dtype=torch.float64).T
    expected = (1.0 - 1.0 / r2) ** 2 + 0.5 * 0.5
    assert expected == pytest.approx(0.3357864376)
    assert correlation_loss(f, g, 0.5).item() == pytest.approx(expected, rel=1e-5)
    assert correlation_loss(g, f, 0.5).item() == pytest.approx(expected, rel=1e-5)


def test_correlation_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        correlation_loss(torch.zeros(4, 3), torch.zeros(4, 2), 0.1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        correlation_loss(torch.zeros(1, 3), torch.zeros(1, 3), 0.1)


# ---------------------------------------------------------------- temporal


def _tokens(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_temporal_zero_when_student_matches_teacher() -> None:
    f_now, f_past = _tokens((2, 5, 4), 0), _tokens((2, 3, 5, 4), 1)
    valid = torch.tensor([[True, True, False], [True, False, True]])
    assert temporal_loss(f_now, f_past, f_now.clone(), valid).item() == pytest.approx(0.0, abs=1e-6)
    assert temporal_loss(f_now, f_past, 3.0 * f_now, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_temporal_invalid_frames_give_exactly_zero_even_with_nan() -> None:
    f_now = _tokens((2, 5, 4), 0)
    f_past = torch.full((2, 2, 5, 4), float("nan"))
    g_now = _tokens((2, 5, 4), 2).requires_grad_(True)
    loss = temporal_loss(f_now, f_past, g_now, torch.zeros(2, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert g_now.grad is not None and torch.equal(g_now.grad, torch.zeros_like(g_now))

    # NaN in an invalid slot does not leak into the valid ones.
    clean = _tokens((2, 2, 5, 4), 1)
    dirty = clean.clone()
    dirty[0, 1] = float("nan")
    valid = torch.tensor([[True, False], [True, True]])
    g = _tokens((2, 5, 4), 2)
    assert temporal_loss(f_now, dirty, g, valid).item() == pytest.approx(temporal_loss(f_now, clean, g, valid).item())
    assert math.isfinite(temporal_loss(f_now, dirty, g, valid).item())


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_temporal_hand_computed_orthogonal_tokens() -> None:
    # Normalised: f_now = [e1, e2], past = [e1, e2], g_now = [e2, e1]; with τ = 0.5 the logits are
    # T = [[2, 0], [0, 2]] and S = [[0, 2], [2, 0]].
    tau = 0.5
    f_now = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    f_past = torch.tensor([[[[0.5, 0.0], [0.0, 4.0]]]])
    g_now = torch.tensor([[[0.0, 2.0], [5.0, 0.0]]])
    t_rows = [_softmax([2.0, 0.0]), _softmax([0.0, 2.0])]
    s_rows = [_softmax([0.0, 2.0]), _softmax([2.0, 0.0])]
    kl_rows = [sum(s * math.log(s / t) for s, t in zip(s_row, t_row, strict=True))
               for s_row, t_row in zip(s_rows, t_rows, strict=True)]
    expected = sum(kl_rows) / 2
    # The closed form of either row: (1 − 2p)·2 with p = 1 / (1 + e²).
    p = 1.0 / (1.0 + math.exp(2.0))
    assert expected == pytest.approx((1.0 - 2.0 * p) * 2.0)
    loss = temporal_loss(f_now, f_past, g_now, torch.tensor([[True]]), tau=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_temporal_equals_the_batched_formula_in_value_and_gradient() -> None:
    """The frame-by-frame evaluation against the docstring's formula written for all (b, k) maps at once."""
    gen = torch.Generator().manual_seed(0)
    f_now, f_past = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 3, 16, 8, generator=gen)
    g_now = torch.randn(2, 16, 8, generator=gen, requires_grad=True)
    valid = torch.tensor([[True, False, True], [True, True, False]])
    tau = 0.2
    f_hat, g_hat, p_hat = (F.normalize(x, dim=-1, eps=1e-6) for x in (f_now, g_now, f_past))
    log_t = torch.log_softmax(torch.einsum("bnd,bkmd->bknm", f_hat, p_hat) / tau, dim=-1)
    log_s = torch.log_softmax(torch.einsum("bnd,bkmd->bknm", g_hat, p_hat) / tau, dim=-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(dim=-1).mean(dim=-1)
    expected = torch.where(valid, kl, torch.zeros_like(kl)).sum() / 2
    (expected_grad,) = torch.autograd.grad(expected, g_now)
    loss = temporal_loss(f_now, f_past, g_now, valid, tau=tau)
    (grad,) = torch.autograd.grad(loss, g_now)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and expected.item() > 0
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_temporal_averages_over_all_samples_and_sums_over_frames() -> None:
    f_now, f_past, g_now = _tokens((1, 4, 3), 0), _tokens((1, 1, 4, 3), 1), _tokens((1, 4, 3), 2)
    single = temporal_loss(f_now, f_past, g_now, torch.tensor([[True]]))
    assert single.item() > 0.0
    pair = temporal_loss(f_now.repeat(2, 1, 1), f_past.repeat(2, 1, 1, 1), g_now.repeat(2, 1, 1),
                         torch.tensor([[True], [False]]))
    assert pair.item() == pytest.approx(single.item() / 2, rel=1e-5)
    two_frames = temporal_loss(f_now, f_past.repeat(1, 2, 1, 1), g_now, torch.tensor([[True, True]]))
    assert two_frames.item() == pytest.approx(2 * single.item(), rel=1e-5)


# ---------------------------------------------------------------- response

_GT = [0.0, 0.0, 0.0, 2.0, 4.0, 1.5, 0.3, 1.0, -0.5]


def _shifted(box: list[float], along: float) -> list[float]:
    """`box` moved by `along` metres along its heading."""
    out = list(box)
    out[0] += along * math.cos(box[6])
    out[1] += along * math.sin(box[6])
    return out


def test_quality_weights_hand_values() -> None:
    far = _shifted(_GT, 30.0)
    teacher = torch.tensor([[_GT, _shifted(_GT, 2.0), far, _GT]])
    scores = torch.tensor([[0.81, 0.64, 0.9, 0.7]])
    gt = [torch.tensor([_GT, _shifted(_GT, 60.0)])]
    valid = torch.tensor([[True, True, True, False]])
    q = quality_weights(teacher, scores, gt, gamma=0.5, valid=valid)
    assert q.shape == (1, 4) and q.dtype == torch.float32 and not q.requires_grad
    expected = [0.9, 0.8 * math.sqrt(1.0 / 3.0), 0.0, 0.0]
    assert q[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert quality_weights(teacher, scores, gt, gamma=0.0)[0, 1].item() == pytest.approx(0.64)
    assert quality_weights(teacher, scores, gt, gamma=1.0)[0, 1].item() == pytest.approx(1.0 / 3.0)
    assert quality_weights(teacher, scores, [torch.zeros(0, 9)]).abs().sum().item() == 0.0


def _response_inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.tensor([[_GT, _shifted(_GT, 1.0), _GT], [_GT, _GT, _GT]])
    student = teacher + 0.2 * torch.randn(2, 3, 9, generator=gen)
    return {
        "teacher_boxes": teacher,
        "teacher_probs": torch.rand(2, 3, 4, generator=gen),
        "teacher_scores": torch.tensor([[0.8, 0.6, 0.0], [0.9, 0.9, 0.9]]),
        "gt_boxes": [torch.tensor([_GT]), torch.zeros(0, 9)],
        "student_boxes": student,
        "student_probs": torch.rand(2, 3, 4, generator=gen),
        "valid": torch.tensor([[True, False, True], [True, True, True]]),
    }


def test_response_ignores_boxes_with_zero_quality() -> None:
    inputs = _response_inputs()
    base = response_loss(**inputs)
    assert base.item() > 0.0
    # Only box (0, 0) has q > 0: (0, 1) is invalid, (0, 2) has score 0, sample 1 has no GT.
    student, probs = inputs["student_boxes"].clone(), inputs["student_probs"].clone()
    for b, m in ((0, 1), (0, 2), (1, 0), (1, 2)):
        student[b, m] = torch.tensor([float("nan"), 5.0, 1.0, -1.0, 0.0, 2.0, 9.0, 1.0, 1.0])
        probs[b, m] = torch.tensor([0.0, 1.0, float("nan"), 0.3])
    student.requires_grad_(True)
    probs.requires_grad_(True)
    changed = response_loss(**{**inputs, "student_boxes": student, "student_probs": probs})
    assert changed.item() == pytest.approx(base.item())
    changed.backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(probs.grad).all()
    assert student.grad[0, 0].abs().sum() > 0 and student.grad[1].abs().sum() == 0


def test_response_zero_for_identical_and_when_no_weight() -> None:
    inputs = _response_inputs()
    same = {**inputs, "student_boxes": inputs["teacher_boxes"].clone(),
            "student_probs": inputs["teacher_probs"].clone()}
    assert response_loss(**same).item() == pytest.approx(0.0, abs=1e-6)
    student = inputs["student_boxes"].clone().requires_grad_(True)
    empty = {**inputs, "gt_boxes": [torch.zeros(0, 9), torch.zeros(0, 9)], "student_boxes": student}
    loss = response_loss(**empty)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_response_hand_value_of_one_box() -> None:
    teacher = torch.tensor([[_GT]])
    student_box = list(_GT)
    student_box[0] += 0.5
    student_box[3] *= math.e  # log w differs by 1
    p, s = 0.7, 0.4
    loss = response_loss(teacher, torch.tensor([[[p]]]), torch.tensor([[0.5]]), [torch.tensor([_GT])],
                         torch.tensor([[student_box]]), torch.tensor([[[s]]]))
    kl = p * math.log(p / s) + (1 - p) * math.log((1 - p) / (1 - s))
    assert loss.item() == pytest.approx(0.5 + 1.0 + kl, rel=1e-5)


def test_response_gradients_reach_only_the_student() -> None:
    inputs = _response_inputs()
    leaves = {}
    for key in ("teacher_boxes", "teacher_probs", "teacher_scores", "student_boxes", "student_probs"):
        leaves[key] = inputs[key].clone().requires_grad_(True)
    loss = response_loss(**{**inputs, **leaves})
    loss.backward()
    for key in ("teacher_boxes", "teacher_probs", "teacher_scores"):
        grad = leaves[key].grad
        assert grad is None or not grad.any()
    for key in ("student_boxes", "student_probs"):
        grad = leaves[key].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------- feature MSE


def test_feature_mse_plain_and_masked() -> None:
    f, g = _tokens((2, 3, 4, 5), 0), _tokens((2, 3, 4, 5), 1)
    assert feature_mse(f, g).item() == pytest.approx(F.mse_loss(f, g).item())
    mask = torch.zeros(2, 4, 5)
    mask[1, 2, 3] = 1.0
    expected = ((f - g)[1, :, 2, 3] ** 2).mean()
    assert feature_mse(f, g, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert feature_mse(f, g, torch.ones(2, 4, 5)).item() == pytest.approx(F.mse_loss(f, g).item(), rel=1e-6)

    rows_f, rows_g = _tokens((6, 3), 2), _tokens((6, 3), 3)
    assert feature_mse(rows_f, rows_g).item() == pytest.approx(F.mse_loss(rows_f, rows_g).item())
    row_mask = torch.tensor([False, False, True, False, False, False])
    expected_row = ((rows_f - rows_g)[2] ** 2).mean()
    assert feature_mse(rows_f, rows_g, row_mask).item() == pytest.approx(expected_row.item(), rel=1e-6)
    assert feature_mse(rows_f, rows_g, torch.zeros(6)).item() == 0.0


# ---------------------------------------------------------------- effective dimension


def test_effective_dimension_reference_spectra() -> None:
    iso = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))
    assert effective_dimension(iso) == pytest.approx(8.0, abs=0.3)

    gen = torch.Generator().manual_seed(1)
    rank_one = torch.randn(500, 1, generator=gen) * torch.randn(1, 6, generator=gen)
    assert effective_dimension(rank_one) == pytest.approx(1.0, abs=1e-6)

    a = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    equal = torch.stack([a, b, torch.zeros(4, dtype=torch.float64)], dim=1) @ rotation
    assert effective_dimension(equal) == pytest.approx(2.0, rel=1e-9)
    unequal = torch.stack([2.0 * a, b, torch.zeros(4, dtype=torch.float64)], dim=1) @ rotation
    assert effective_dimension(unequal) == pytest.approx(25.0 / 17.0, rel=1e-9)

    assert effective_dimension(torch.zeros(10, 4)) == 0.0


# ---------------------------------------------------------------- gradients


def test_correlation_and_temporal_backprop_to_the_student() -> None:
    f = _features().float()
    g = (f + torch.randn(f.shape, generator=torch.Generator().manual_seed(5))).requires_grad_(True)
    correlation_loss(f, g, 0.005).backward()
    assert g.grad is not None and torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0
    assert not f.requires_grad

    # A dead (constant) student channel counts as uncorrelated and keeps the gradients finite.
    dead = g.detach().clone()
    dead[:, 1] = 2.0
    dead.requires_grad_(True)
    loss = correlation_loss(f, dead, 0.0)
    loss.backward()
    assert torch.isfinite(dead.grad).all() and loss.item() >= 1.0 - 1e-4

    f_now, f_past = _tokens((2, 5, 4), 0), _tokens((2, 2, 5, 4), 1)
    g_now = _tokens((2, 5, 4), 2).requires_grad_(True)
    temporal_loss(f_now, f_past, g_now, torch.tensor([[True, False], [True, True]])).backward()
    assert g_now.grad is not None and torch.isfinite(g_now.grad).all() and g_now.grad.abs().sum() > 0
