"""Knowledge distillation: the soft-target loss and the Distiller mixing it with the labels."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdprune.train.distill import Distiller, distillation_loss


def test_soft_target_loss_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    T = 3.0
    p_t = torch.softmax(t / T, -1)
    expected = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert math.isclose(float(distillation_loss(s, t, T)), float(expected), rel_tol=1e-5)
    assert float(distillation_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)  # same distribution: nothing to learn
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, 0.0)


def test_distiller_mixes_labels_and_teacher_and_freezes_the_teacher():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    d = Distiller(teacher, weight=0.25, temperature=2.0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    out = student(x)
    expected = 0.75 * F.cross_entropy(out, y) + 0.25 * distillation_loss(out, teacher(x), 2.0)
    assert torch.allclose(d(x, out, y), expected, rtol=1e-5)
    d(x, out, y).backward()  # gradients reach the student only
    assert student.weight.grad is not None and teacher.weight.grad is None
    assert torch.allclose(Distiller(teacher, weight=0.0)(x, out, y), F.cross_entropy(out, y))
    with pytest.raises(ValueError, match="share"):
        Distiller(teacher, weight=1.5)


def test_train_epoch_takes_the_distillation_loss():
    from mdprune.train.loop import TrainConfig, make_optimizer, make_scheduler, train_epoch

    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    calls = []
    d = Distiller(teacher, weight=1.0, temperature=2.0)

    def loss_fn(x, out, y):
        calls.append(x.shape[0])
        return d(x, out, y)

    cfg = TrainConfig(lr=0.5, momentum=0.0, weight_decay=0.0)
    opt = make_optimizer(student, cfg)
    before = sum(float(distillation_loss(student(x), teacher(x), 2.0)) for x, _ in data)
    for _ in range(5):
        train_epoch(student, data, opt, make_scheduler(opt, TrainConfig(epochs=100), 3), cfg, torch.device("cpu"),
                    loss_fn=loss_fn)
    after = sum(float(distillation_loss(student(x), teacher(x), 2.0)) for x, _ in data)
    assert calls == [8] * 15 and after < before  # the student moved towards the teacher
