"""Distillation loss against hand-computed numbers; the training loop and evaluation."""
import math

import pytest
import torch
from models import make_model

from vitprune_fast.finetune import DEFAULT_ALPHA, distillation_loss, evaluate, lr_scheduler, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(q, p):
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))


# Logits are logs of unnormalised probabilities, so softmax is a / sum(a), known exactly.
STUDENT = [[0.0, math.log(3), math.log(6)], [5.0, 5.0, 5.0]]  # p = (.1, .3, .6), (1/3, 1/3, 1/3)
TEACHER = [[math.log(2), math.log(2), 0.0], [-1.0, -1.0, -1 + math.log(2)]]  # q = (.4, .4, .2), (.25, .25, .5)
LABELS = [2, 0]
P = [(0.1, 0.3, 0.6), (1 / 3, 1 / 3, 1 / 3)]
Q = [(0.4, 0.4, 0.2), (0.25, 0.25, 0.5)]


@pytest.mark.parametrize("alpha", [0.0, 1.0, DEFAULT_ALPHA])
def test_distillation_loss_equals_hand_computed(alpha):
    ce = (-math.log(0.6) - math.log(1 / 3)) / 2  # mean over the batch of -log p_y
    kl = (0.4 * math.log(4) + 0.4 * math.log(4 / 3) + 0.2 * math.log(1 / 3)  # sample 1: sum_k q log(q/p)
          + 0.25 * math.log(0.75) * 2 + 0.5 * math.log(1.5)) / 2  # sample 2; batchmean
    assert kl == pytest.approx((_kl(Q[0], P[0]) + _kl(Q[1], P[1])) / 2)
    loss = distillation_loss(torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(LABELS),
                             torch.tensor(TEACHER, dtype=torch.float64), alpha=alpha)
    assert loss.item() == pytest.approx(ce + alpha * kl, rel=1e-12)


def test_distillation_loss_temperature_scales_kl_by_t_squared():
    t = 2.0
    ce = (-math.log(0.6) - math.log(1 / 3)) / 2  # CE stays at temperature 1
    kl = 0.0
    for p, q in zip(P, Q, strict=True):  # softmax(log(a) / T) = a**(1/T) / sum
        ps = [v ** (1 / t) / sum(w ** (1 / t) for w in p) for v in p]
        qs = [v ** (1 / t) / sum(w ** (1 / t) for w in q) for v in q]
        kl += _kl(qs, ps) / 2
    loss = distillation_loss(torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(LABELS),
                             torch.tensor(TEACHER, dtype=torch.float64), alpha=0.5, temperature=t)
    assert loss.item() == pytest.approx(ce + 0.5 * t * t * kl, rel=1e-12)


def test_distillation_loss_without_teacher_is_cross_entropy():
    loss = distillation_loss(torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(LABELS))
    assert loss.item() == pytest.approx((-math.log(0.6) - math.log(1 / 3)) / 2, rel=1e-12)


def _lrs(steps, warmup, lr=1.0):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = lr_scheduler(opt, steps, warmup)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = _lrs(100, 10)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] < 1e-3


@pytest.mark.parametrize("steps, warmup", [(100, 10), (37, 5), (5, 1), (3, 0)])
def test_library_schedule_is_linear_warmup_then_cosine(steps, warmup):
    """torch's LinearLR + CosineAnnealingLR give lr * (k + 1) / warmup, then the half cosine to zero."""
    want = [0.3 * ((k + 1) / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup))))
            for k in range(steps)]
    assert _lrs(steps, warmup, lr=0.3) == pytest.approx(want, rel=1e-12, abs=1e-15)


def _data(model, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def test_precomputed_teacher_logits_equal_running_the_teacher():
    teacher = make_model("deit", seed=1)
    x, y = _data(teacher)
    with torch.no_grad():
        t_logits = teacher(x)
    a, b = make_model("deit", seed=2), make_model("deit", seed=2)
    la = train(a, [(x[:8], y[:8]), (x[8:], y[8:])], steps=4, teacher=teacher, progress=False)
    lb = train(b, [(x[:8], y[:8], t_logits[:8]), (x[8:], y[8:], t_logits[8:])], steps=4, progress=False)
    assert la == pytest.approx(lb, rel=1e-10)
    assert all(torch.allclose(p, q, rtol=1e-9, atol=1e-12) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_training_reduces_the_distillation_loss():
    teacher, student = make_model("deit", seed=1), make_model("deit", seed=2)
    x, y = _data(teacher)
    losses = train(student, [(x, y)], steps=30, lr=3e-3, teacher=teacher, progress=False)
    assert losses[-1] < 0.5 * losses[0]
    assert not student.training


def test_evaluate_counts_correct_predictions():
    model = make_model("deit")
    x, _ = _data(model, n=10)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    y = pred.clone()
    y[:3] = (y[:3] + 1) % 10  # exactly 3 wrong
    assert evaluate(model, [(x[:4], y[:4]), (x[4:], y[4:])]) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="no images"):
        evaluate(model, [])
