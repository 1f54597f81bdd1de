"""The STXD losses and the d_eff diagnostic on tiny tensors whose values can be checked by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.grid import BEVGrid
from stxd_train.distill import (
    GTMatch,
    best_gt_iou,
    cell_weights,
    correlation_loss,
    effective_dimension,
    feature_mse,
    gt_foreground,
    quality_weights,
    response_loss,
    teacher_foreground,
    temporal_loss,
)
from stxd_train.distill.foreground import footprints, gaussians
from stxd_train.distill.response import PAPER_MATCH, decoded_codes

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
    labels = {"teacher_labels": torch.zeros(1, 4, dtype=torch.long), "gt_labels": [torch.zeros(2, dtype=torch.long)]}
    valid = torch.tensor([[True, True, True, False]])
    q = quality_weights(teacher, scores, gt, gamma=0.5, valid=valid, **labels)
    assert q.shape == (1, 4) and q.dtype == torch.float32 and not q.requires_grad
    expected = [0.9, 0.8 * math.sqrt(1.0 / 3.0), 0.0, 0.0]
    assert q[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert quality_weights(teacher, scores, gt, gamma=0.0, **labels)[0, 1].item() == pytest.approx(0.64)
    assert quality_weights(teacher, scores, gt, gamma=1.0, **labels)[0, 1].item() == pytest.approx(1.0 / 3.0)
    no_gt = quality_weights(teacher, scores, [torch.zeros(0, 9)], teacher_labels=labels["teacher_labels"],
                            gt_labels=[torch.zeros(0, dtype=torch.long)])
    assert no_gt.abs().sum().item() == 0.0
    # The paper's class-blind matching needs no labels.
    assert quality_weights(teacher, scores, gt, valid=valid, match=PAPER_MATCH)[0].tolist() == pytest.approx(expected)


def _turned(box: list[float], angle: float) -> list[float]:
    out = list(box)
    out[6] += angle
    return out


def test_best_gt_iou_counts_only_gt_of_the_teacher_class() -> None:
    teacher = np.array([_GT, _shifted(_GT, 1.0)])
    gt = np.array([_GT, _shifted(_GT, 1.0)])          # an object of class 0, and an overlapping one of class 1
    iou_pair = float(best_gt_iou(teacher[:1], gt[1:], match=PAPER_MATCH)[0])
    assert 0.3 < iou_pair < 1.0
    blind = best_gt_iou(teacher, gt, match=PAPER_MATCH)
    assert blind.tolist() == pytest.approx([1.0, 1.0])
    aware = best_gt_iou(teacher, gt, np.array([1, 2]), np.array([0, 1]), GTMatch(drop_flipped=False))
    # Teacher box 0 says class 1: only GT 1 counts; teacher box 1 says class 2: no GT of its class.
    assert aware.tolist() == pytest.approx([iou_pair, 0.0])
    with pytest.raises(ValueError, match="needs teacher_labels and gt_labels"):
        best_gt_iou(teacher, gt)
    with pytest.raises(ValueError, match="one class index per box"):
        best_gt_iou(teacher, gt, np.array([0]), np.array([0, 1]))


def test_best_gt_iou_drops_teacher_boxes_turned_more_than_90_degrees() -> None:
    gt = np.array([_GT])
    turns = [math.pi, -math.pi, 0.45 * math.pi, 0.55 * math.pi, -0.55 * math.pi, 2.0 * math.pi - 0.1]
    teacher = np.array([_turned(_GT, a) for a in turns])
    blind = best_gt_iou(teacher, gt, match=PAPER_MATCH)
    assert blind[:2].tolist() == pytest.approx([1.0, 1.0])    # IoU cannot see a 180° flip
    assert (blind > 0.2).all()
    dropped = best_gt_iou(teacher, gt, np.zeros(6), np.zeros(1), GTMatch())
    assert dropped.tolist() == pytest.approx([0.0, 0.0, blind[2], 0.0, 0.0, blind[5]])
    kept = best_gt_iou(teacher, gt, np.zeros(6), np.zeros(1), GTMatch(drop_flipped=False))
    assert kept.tolist() == pytest.approx(blind.tolist())


def test_quality_weights_class_aware_and_flips_through_the_loader_iou() -> None:
    teacher = torch.tensor([[_GT, _turned(_GT, math.pi), _GT]])
    scores = torch.tensor([[0.64, 0.64, 0.64]])
    labels = torch.tensor([[0, 0, 3]])
    gt, gt_labels = [torch.tensor([_GT])], [torch.tensor([0])]
    q = quality_weights(teacher, scores, gt, teacher_labels=labels, gt_labels=gt_labels)
    assert q[0].tolist() == pytest.approx([0.8, 0.0, 0.0])
    paper = quality_weights(teacher, scores, gt, match=PAPER_MATCH)
    assert paper[0].tolist() == pytest.approx([0.8, 0.8, 0.8])
    # A precomputed IoU (the loader's) replaces the matching.
    iou = torch.from_numpy(best_gt_iou(teacher[0], gt[0], labels[0], gt_labels[0])).float()[None]
    assert torch.equal(quality_weights(teacher, scores, gt, iou=iou), q)


def _paper_response(teacher_boxes: torch.Tensor, teacher_probs: torch.Tensor, teacher_scores: torch.Tensor,
                    gt_boxes: list[torch.Tensor], student_boxes: torch.Tensor, student_probs: torch.Tensor,
                    gamma: float = 0.5, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RD as the paper reads it: a class-blind quality and decoded boxes re-encoded, with unit weights."""
    q = quality_weights(teacher_boxes, teacher_scores, gt_boxes, gamma=gamma, valid=valid, match=PAPER_MATCH)
    used = q > 0
    return response_loss(decoded_codes(teacher_boxes, used), teacher_probs, decoded_codes(student_boxes, used),
                         student_probs, q)


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
    base = _paper_response(**inputs)
    assert base.item() > 0.0
    # Only box (0, 0) has q > 0: (0, 1) is invalid, (0, 2) has score 0, sample 1 has no GT.
    student, probs = inputs["student_boxes"].clone(), inputs["student_probs"].clone()
    for b, m in ((0, 1), (0, 2), (1, 0), (1, 2)):
        student[b, m] = torch.tensor([float("nan"), 5.0, 1.0, -1.0, 0.0, 2.0, 9.0, 1.0, 1.0])
        probs[b, m] = torch.tensor([0.0, 1.0, float("nan"), 0.3])
    student.requires_grad_(True)
    probs.requires_grad_(True)
    changed = _paper_response(**{**inputs, "student_boxes": student, "student_probs": probs})
    assert changed.item() == pytest.approx(base.item())
    changed.backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(probs.grad).all()
    assert student.grad[0, 0].abs().sum() > 0 and student.grad[1].abs().sum() == 0
    # The same in code space: NaN or -inf codes of unused slots reach neither the value nor the gradient.
    q = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    codes = torch.zeros(2, 2, 10)
    teacher_codes = codes.clone()
    teacher_codes[0, 1], teacher_codes[1] = float("-inf"), float("nan")
    student_codes = (codes + 0.5).requires_grad_(True)
    loss = response_loss(teacher_codes, torch.full((2, 2, 3), 0.5), student_codes, torch.full((2, 2, 3), 0.5), q)
    loss.backward()
    assert loss.item() == pytest.approx(5.0)
    assert student_codes.grad[0, 0].tolist() == pytest.approx([1.0] * 10) and student_codes.grad[1:].abs().sum() == 0
    assert student_codes.grad[0, 1].abs().sum() == 0


def test_response_zero_for_identical_and_when_no_weight() -> None:
    inputs = _response_inputs()
    same = {**inputs, "student_boxes": inputs["teacher_boxes"].clone(),
            "student_probs": inputs["teacher_probs"].clone()}
    assert _paper_response(**same).item() == pytest.approx(0.0, abs=1e-6)
    student = inputs["student_boxes"].clone().requires_grad_(True)
    empty = {**inputs, "gt_boxes": [torch.zeros(0, 9), torch.zeros(0, 9)], "student_boxes": student}
    loss = _paper_response(**empty)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_response_hand_value_of_one_box() -> None:
    teacher = torch.tensor([[_GT]])
    student_box = list(_GT)
    student_box[0] += 0.5
    student_box[3] *= math.e  # log w differs by 1
    p, s = 0.7, 0.4
    loss = _paper_response(teacher, torch.tensor([[[p]]]), torch.tensor([[0.5]]), [torch.tensor([_GT])],
                           torch.tensor([[student_box]]), torch.tensor([[[s]]]))
    kl = p * math.log(p / s) + (1 - p) * math.log((1 - p) / (1 - s))
    assert loss.item() == pytest.approx(0.5 + 1.0 + kl, rel=1e-5)


def test_response_weighs_each_code_entry() -> None:
    teacher_codes = torch.zeros(1, 2, 10)
    student_codes = torch.zeros(1, 2, 10)
    student_codes[0, 0] = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0, -1.0])
    student_codes[0, 1, 0] = 4.0
    probs = torch.full((1, 2, 1), 0.5)
    q = torch.tensor([[0.75, 0.25]])
    weights = [0.25 * w for w in (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)]   # code_weights × bbox_weight
    loss = response_loss(teacher_codes, probs, student_codes, probs, q, weights)
    first = 0.25 * (0.5 + 1.0 + 0.2 * 2.0 + 0.2 * 1.0)
    second = 0.25 * 4.0
    assert loss.item() == pytest.approx((0.75 * first + 0.25 * second) / 1.0, rel=1e-6)
    assert response_loss(teacher_codes, probs, student_codes, probs, q).item() == pytest.approx(
        0.75 * 4.5 + 0.25 * 4.0, rel=1e-6)
    with pytest.raises(ValueError, match="one weight per code entry"):
        response_loss(teacher_codes, probs, student_codes, probs, q, [1.0] * 9)
    with pytest.raises(ValueError, match="q must have the shape"):
        response_loss(teacher_codes, probs, student_codes, probs, q[:, :1])


def test_response_gradients_reach_only_the_student() -> None:
    inputs = _response_inputs()
    leaves = {}
    for key in ("teacher_boxes", "teacher_probs", "teacher_scores", "student_boxes", "student_probs"):
        leaves[key] = inputs[key].clone().requires_grad_(True)
    loss = _paper_response(**{**inputs, **leaves})
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


# ---------------------------------------------------------------- foreground weights


def test_correlation_weights_are_row_weights() -> None:
    f = _features(n=64)
    g = f + 0.5 * _features(n=64, seed=1)
    plain = correlation_loss(f, g, 0.005)
    assert correlation_loss(f, g, 0.005, torch.ones(64)).item() == pytest.approx(plain.item(), rel=1e-9)
    assert correlation_loss(f, g, 0.005, torch.full((64,), 7.0)).item() == pytest.approx(plain.item(), rel=1e-9)
    # Binary weights: the statistics and correlations of the chosen rows alone.
    chosen = torch.zeros(64)
    chosen[:20] = 1.0
    assert correlation_loss(f, g, 0.005, chosen).item() == pytest.approx(
        correlation_loss(f[:20], g[:20], 0.005).item(), rel=1e-9)
    # Integer weights: each row repeated that many times.
    counts = torch.tensor([1, 2, 3, 1] * 16)
    repeated = correlation_loss(f.repeat_interleave(counts, 0), g.repeat_interleave(counts, 0), 0.005)
    assert correlation_loss(f, g, 0.005, counts.double()).item() == pytest.approx(repeated.item(), rel=1e-9)
    # No weight at all: 0 with a gradient path.
    student = g.clone().requires_grad_(True)
    zero = correlation_loss(f, student, 0.005, torch.zeros(64))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))
    with pytest.raises(ValueError, match="one weight per row"):
        correlation_loss(f, g, 0.005, torch.ones(63))
    with pytest.raises(ValueError, match="finite weights >= 0"):
        correlation_loss(f, g, 0.005, -torch.ones(64))


def test_temporal_weights_are_a_weighted_mean_over_current_tokens() -> None:
    gen = torch.Generator().manual_seed(3)
    f_now, f_past = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 2, 6, 4, generator=gen)
    g_now = torch.randn(2, 6, 4, generator=gen)
    valid = torch.tensor([[True, True], [True, False]])
    plain = temporal_loss(f_now, f_past, g_now, valid)
    assert temporal_loss(f_now, f_past, g_now, valid, weights=torch.ones(2, 6)).item() == pytest.approx(plain.item())
    assert temporal_loss(f_now, f_past, g_now, valid, weights=torch.full((2, 6), 0.1)).item() == pytest.approx(
        plain.item())
    weights = torch.tensor([[1.0, 0.1, 0.1, 0.5, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    f_hat, g_hat, p_hat = (F.normalize(x, dim=-1, eps=1e-6) for x in (f_now, g_now, f_past))
    log_t = torch.log_softmax(torch.einsum("bnd,bkmd->bknm", f_hat, p_hat) / 0.1, dim=-1)
    log_s = torch.log_softmax(torch.einsum("bnd,bkmd->bknm", g_hat, p_hat) / 0.1, dim=-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(dim=-1)                               # (B, K, N) per row
    expected = (kl[0] * weights[0]).sum() / weights[0].sum()                        # sample 1 has no weight
    loss = temporal_loss(f_now, f_past, g_now, valid, weights=weights)
    assert loss.item() == pytest.approx(expected.item() / 2, rel=1e-5) and loss.item() > 0
    with pytest.raises(ValueError, match=r"weights of shape \(B, N\)"):
        temporal_loss(f_now, f_past, g_now, valid, weights=torch.ones(6))


def test_footprints_mark_cell_centres_inside_rotated_boxes() -> None:
    grid = BEVGrid.square(4.0, 8)                                      # 1 m cells, centres at ±0.5, ±1.5, ...
    along_x = torch.tensor([[0.5, 0.5, 0.0, 1.0, 3.0, 1.0, 0.0]])          # 3 m along x through row 4
    fp = footprints(along_x, grid)
    assert fp.shape == (8, 8) and fp.sum().item() == 3.0
    assert fp[4, 3:6].tolist() == [1.0, 1.0, 1.0]                         # x = -0.5, 0.5, 1.5 at y = 0.5
    along_y = torch.tensor([[0.5, 0.5, 0.0, 1.0, 3.0, 1.0, math.pi / 2]])
    assert footprints(along_y, grid)[3:6, 4].tolist() == [1.0, 1.0, 1.0]
    assert footprints(torch.zeros(0, 9), grid).sum().item() == 0.0
    assert footprints(torch.tensor([[0.5, 0.5, 0.0, 0.0, 3.0, 1.0, 0.0]]), grid).sum().item() == 0.0  # no width


def test_gaussians_are_the_head_heatmap_targets() -> None:
    from stxd_cache.teacher.center_head import CenterHead
    from stxd_cache.teacher.config import DecodeConfig, LossConfig, TargetConfig

    grid = BEVGrid.square(8.0, 16)
    boxes = torch.tensor([[0.3, 0.2, 0.0, 1.8, 4.4, 1.5, 0.4, 0.0, 0.0],
                          [-5.5, 4.0, 0.0, 0.6, 0.7, 1.7, 0.0, 0.0, 0.0]])
    target = TargetConfig(gaussian_overlap=0.1, min_radius=1)
    head = CenterHead(in_channels=4, tasks=[["car", "pedestrian"]], share_conv_channels=4, head_conv_channels=4,
                      num_heatmap_convs=2, target=target, loss=LossConfig(), decode=DecodeConfig(nms="rotated"))
    heat = head.build_targets([boxes], [torch.tensor([0, 8])], grid).heatmaps[0][0].amax(dim=0)
    ours = gaussians(boxes, torch.ones(2), grid, gaussian_overlap=0.1, min_radius=1)
    torch.testing.assert_close(ours, heat, rtol=0, atol=1e-6)
    assert ours.max().item() == 1.0 and (ours > 0).sum().item() > 9
    scaled = gaussians(boxes, torch.tensor([0.5, 0.25]), grid, gaussian_overlap=0.1, min_radius=1)
    torch.testing.assert_close(scaled.max(), torch.tensor(0.5))


def test_gt_and_teacher_foreground_and_cell_weights() -> None:
    grid = BEVGrid.square(4.0, 8)
    tiny_box = [0.5, 0.5, 0.0, 0.1, 0.1, 1.0, 0.0, 0.0, 0.0]      # holds no cell centre; radius min_radius = 1
    fg = gt_foreground([torch.tensor([tiny_box]), torch.zeros(0, 9)], grid, gaussian_overlap=0.1, min_radius=1)
    assert fg.shape == (2, 8, 8) and fg[1].sum().item() == 0.0
    sigma2 = 0.5**2                                               # σ = (2·1 + 1) / 6
    assert fg[0, 4, 4].item() == 1.0                              # the centre cell (col 4, row 4)
    assert fg[0, 4, 5].item() == pytest.approx(math.exp(-1 / (2 * sigma2)))
    assert fg[0, 5, 5].item() == pytest.approx(math.exp(-2 / (2 * sigma2)))
    assert fg[0, 4, 6].item() == 0.0 and (fg[0] > 0).sum().item() == 9
    big = [0.5, 0.5, 0.0, 1.0, 7.0, 1.0, 0.0, 0.0, 0.0]           # footprint along row 4 beyond the Gaussian
    assert gt_foreground([torch.tensor([big])], grid, gaussian_overlap=0.1, min_radius=1)[0, 4, 1:8].min() == 1.0

    boxes = torch.tensor([[tiny_box, tiny_box]])
    teacher = teacher_foreground(boxes, torch.tensor([[0.6, 0.9]]), torch.tensor([[True, False]]), grid,
                                 gaussian_overlap=0.1, min_radius=1)
    torch.testing.assert_close(teacher, 0.6 * fg[:1])
    weights = cell_weights(fg, 0.1)
    assert weights[0, 4, 4].item() == 1.0 and weights[1].unique().tolist() == pytest.approx([0.1])
    assert weights[0, 4, 5].item() == pytest.approx(0.1 + 0.9 * math.exp(-2))
    with pytest.raises(ValueError, match="background_weight"):
        cell_weights(fg, 1.5)
