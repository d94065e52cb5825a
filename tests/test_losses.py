"""Tests of pipeline.training.losses: the focal loss against cross-entropy and a hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from pipeline.training.losses import FocalLoss, build_loss

CONF_LOSS = Path(__file__).resolve().parents[1] / "conf" / "loss"

# Two samples, three classes: a confident correct one and a uniform one.
LOGITS = [[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
TARGETS = [0, 2]


def _hand_focal(gamma: float, alpha: list[float] | None = None) -> list[float]:
    """Per-sample focal loss computed with the math module only."""
    out = []
    for row, y in zip(LOGITS, TARGETS):
        p = math.exp(row[y]) / sum(math.exp(v) for v in row)
        weight = 1.0 if alpha is None else alpha[y]
        out.append(-weight * (1 - p) ** gamma * math.log(p))
    return out


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(LOGITS, requires_grad=True), torch.tensor(TARGETS)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gamma0_without_alpha_is_cross_entropy(reduction):
    torch.manual_seed(0)
    logits, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    focal = FocalLoss(gamma=0.0, alpha=None, reduction=reduction)(logits, target)
    torch.testing.assert_close(focal, F.cross_entropy(logits, target, reduction=reduction))


def test_hand_computed_value():
    logits, target = _inputs()
    expected = _hand_focal(gamma=2.0)
    # p_t = 0.665 and 1/3: (1-p)^2 down-weights the confident sample about 9x vs CE (0.408).
    assert expected[0] == pytest.approx(0.045678, abs=1e-6)
    assert expected[1] == pytest.approx(0.488272, abs=1e-6)
    loss = FocalLoss(gamma=2.0, reduction="mean")(logits, target)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_per_class_alpha_weights_each_sample_by_its_class():
    logits, target = _inputs()
    alpha = [0.25, 0.5, 1.0]
    per_sample = FocalLoss(gamma=1.0, alpha=alpha, reduction="none")(logits, target)
    torch.testing.assert_close(per_sample, torch.tensor(_hand_focal(1.0, alpha)))
    # gamma 0 + per-class alpha summed is weighted cross-entropy summed
    logits2, target2 = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(
        FocalLoss(gamma=0.0, alpha=alpha, reduction="sum")(logits2, target2),
        F.cross_entropy(logits2, target2, weight=torch.tensor(alpha), reduction="sum"))


def test_scalar_alpha_only_scales():
    logits, target = _inputs()
    plain = FocalLoss(gamma=1.0)(logits, target)
    torch.testing.assert_close(FocalLoss(gamma=1.0, alpha=0.8)(logits, target), 0.8 * plain)


def test_sum_is_batch_size_times_mean():
    torch.manual_seed(1)
    logits, target = torch.randn(5, 3), torch.randint(0, 3, (5,))
    mean = FocalLoss(gamma=3.0, alpha=0.7, reduction="mean")(logits, target)
    total = FocalLoss(gamma=3.0, alpha=0.7, reduction="sum")(logits, target)
    torch.testing.assert_close(total, 5 * mean)


def test_gradients_flow():
    logits, target = _inputs()
    FocalLoss(gamma=2.0, alpha=[1.0, 1.0, 2.0])(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad.abs().sum(dim=1) > 0).all()
    # the true class's logit is pushed up
    assert logits.grad[0, 0] < 0 and logits.grad[1, 2] < 0


def test_focal_is_stable_for_extreme_logits():
    logits = torch.tensor([[80.0, -80.0, 0.0], [-80.0, 80.0, 0.0]], requires_grad=True)
    loss = FocalLoss(gamma=2.0)(logits, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_build_loss_from_conf_files():
    ce = build_loss(OmegaConf.load(CONF_LOSS / "ce.yaml"), num_classes=3)
    assert isinstance(ce, nn.CrossEntropyLoss) and ce.reduction == "mean"
    focal = build_loss(OmegaConf.load(CONF_LOSS / "focal.yaml"), num_classes=3)
    assert isinstance(focal, FocalLoss)
    assert (focal.gamma, focal.alpha.item(), focal.reduction) == (1.0, pytest.approx(0.8), "mean")


def test_build_ce_options():
    ce = build_loss({"name": "ce", "label_smoothing": 0.1, "class_weights": [1, 2, 3]}, 3)
    torch.manual_seed(2)
    logits, target = torch.randn(4, 3), torch.randint(0, 3, (4,))
    torch.testing.assert_close(ce(logits, target), F.cross_entropy(
        logits, target, weight=torch.tensor([1.0, 2.0, 3.0]), label_smoothing=0.1))


def test_build_focal_per_class_alpha_and_sum():
    loss = build_loss({"name": "focal", "gamma": 0, "alpha": [0.25, 0.5, 1.0],
                       "reduction": "sum"}, 3)
    logits, target = _inputs()
    assert loss(logits, target).item() == pytest.approx(sum(_hand_focal(0.0, [0.25, 0.5, 1.0])),
                                                        rel=1e-6)


def test_build_loss_errors_name_the_key():
    with pytest.raises(ValueError, match="valid names: ce, focal"):
        build_loss({"name": "dice"}, 3)
    with pytest.raises(ValueError, match="loss.gamma.*valid keys"):
        build_loss({"name": "ce", "gamma": 2}, 3)
    with pytest.raises(ValueError, match="loss.alpha has 2 weights but there are 3 classes"):
        build_loss({"name": "focal", "alpha": [1, 2]}, 3)
    with pytest.raises(ValueError, match="reduction"):
        build_loss({"name": "focal", "reduction": "avg"}, 3)
