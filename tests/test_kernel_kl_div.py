"""Fused log-softmax + KL per candidate (``vitprune_fast.kernels.kl_div``) against float64 references.

Pass rule (FlashAttention style; README, 'Architecture', kernels):
``|kernel - ref64| <= 2 * |torch_same_dtype - ref64| + atol``.
On CPU the kernel runs in the Triton interpreter (conftest sets ``TRITON_INTERPRET=1``), which handles every
dtype used here; the ``gpu`` tests repeat the checks on CUDA at engine-sized shapes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vitprune_fast.kernels.kl_div import kl_div_ref, kl_per_candidate

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _make(n, num_classes, k, dtype, device="cpu", scale=3.0, noise=0.5):
    """Teacher logits and K perturbed student copies (never zero, realistic spread)."""
    t = torch.randn(n, num_classes, dtype=torch.float64, device=device) * scale
    s = t.repeat(k, 1) + noise * torch.randn(k * n, num_classes, dtype=torch.float64, device=device)
    return t.to(dtype), s.to(dtype)


def _assert_fa_close(out, t, s, k, atol_scale=1.0):
    ref = kl_div_ref(t, s, k, compute_dtype=torch.float64)
    pt = kl_div_ref(t, s, k)  # plain torch at the input dtype
    err = (out.double() - ref).abs().max().item()
    err_pt = (pt.double() - ref).abs().max().item()
    atol = ATOL[torch.promote_types(t.dtype, s.dtype)] * atol_scale
    assert err <= 2 * err_pt + atol, f"kernel err {err:.3e} > 2 * torch err {err_pt:.3e} + {atol:.1e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n, num_classes, k",
    [(4, 1000, 3), (3, 1001, 2), (2, 7, 5), (2, 5003, 2), (1, 1, 1)],
    ids=["imagenet", "imagenet+1", "tiny-odd", "multi-block", "one-class"],
)
def test_matches_fp64_reference(n, num_classes, k, dtype):
    t, s = _make(n, num_classes, k, dtype)
    out = kl_per_candidate(t, s, k)
    assert out.shape == (k,)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_fa_close(out, t, s, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_logits_are_stable(dtype):
    # Logits of magnitude ~100 overflow a naive exp; the online log-sum-exp must stay finite and exact.
    t, s = _make(3, 1000, 2, dtype, scale=40.0, noise=5.0)
    out = kl_per_candidate(t, s, 2)
    assert torch.isfinite(out).all()
    _assert_fa_close(out, t, s, 2, atol_scale=10.0)


def test_identical_student_scores_zero():
    t, _ = _make(3, 1001, 1, torch.float32)
    out = kl_per_candidate(t, t.repeat(4, 1), 4)
    assert torch.equal(out, torch.zeros(4))


def test_candidate_major_stacking_and_sum_over_images():
    n, k = 3, 4
    t, s = _make(n, 37, k, torch.float64)
    out = kl_per_candidate(t, s, k)
    for j in range(k):
        one = kl_per_candidate(t, s[j * n : (j + 1) * n], 1)  # candidate j alone
        per_image = sum(kl_per_candidate(t[i : i + 1], s[j * n + i : j * n + i + 1], 1) for i in range(n))
        torch.testing.assert_close(out[j : j + 1], one, rtol=0, atol=1e-12)
        torch.testing.assert_close(one, per_image, rtol=0, atol=1e-12)


def test_matches_torch_kl_div():
    # UP-ViTs' formula is KL(q || p) with q = teacher: F.kl_div(log p, log q, log_target=True), summed.
    n, k = 4, 3
    t, s = _make(n, 1000, k, torch.float64)
    log_q = torch.log_softmax(t, -1).repeat(k, 1)
    log_p = torch.log_softmax(s, -1)
    expect = torch.nn.functional.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1).view(k, n).sum(1)
    torch.testing.assert_close(kl_per_candidate(t, s, k), expect, rtol=1e-12, atol=1e-12)


def test_teacher_log_probs_give_same_scores():
    t, s = _make(3, 1000, 2, torch.float32)
    a = kl_per_candidate(t, s, 2)
    b = kl_per_candidate(torch.log_softmax(t, -1), s, 2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_fp32_teacher_bf16_student():
    t, s = _make(3, 1001, 2, torch.float32)
    s = s.to(torch.bfloat16)
    out = kl_per_candidate(t, s, 2)
    assert out.dtype == torch.float32
    ref = kl_div_ref(t, s, 2, compute_dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_strided_rows():
    t, s = _make(3, 1001, 2, torch.float32)
    wide = torch.randn(s.shape[0], 1100)
    wide[:, 50:1051] = s
    view = wide[:, 50:1051]  # row stride 1100, unit column stride
    assert not view.is_contiguous()
    torch.testing.assert_close(kl_per_candidate(t, view, 2), kl_per_candidate(t, s, 2), rtol=0, atol=0)
    col_strided = s.t().contiguous().t()  # column stride != 1: copied by the launcher
    torch.testing.assert_close(kl_per_candidate(t, col_strided, 2), kl_per_candidate(t, s, 2), rtol=0, atol=0)


def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t, s = _make(3, 1000, 2, torch.bfloat16)
    out = kl_per_candidate(t, s, 2)
    assert out.dtype == torch.float32
    _assert_fa_close(out, t, s, 2)


@pytest.mark.parametrize(
    "t_shape, s_shape, k",
    [
        ((4, 10), (12, 11), 3),  # class counts differ
        ((4, 10), (11, 10), 3),  # rows != K * n
        ((4, 10), (4, 10), 0),  # K < 1
        ((40,), (120,), 3),  # not 2-D
        ((4, 10, 1), (12, 10, 1), 3),  # not 2-D
        ((4, 0), (12, 0), 3),  # no classes
    ],
)
def test_invalid_shapes_raise(t_shape, s_shape, k):
    with pytest.raises(ValueError):
        kl_per_candidate(torch.randn(t_shape), torch.randn(s_shape), k)


def test_integer_like_k_and_empty_batch():
    import numpy as np

    t, s = _make(2, 10, 3, torch.float32)
    torch.testing.assert_close(kl_per_candidate(t, s, np.int64(3)), kl_per_candidate(t, s, 3), rtol=0, atol=0)
    assert torch.equal(kl_per_candidate(torch.randn(0, 10), torch.randn(0, 10), 4), torch.zeros(4))


def test_invalid_types_raise():
    with pytest.raises(ValueError):
        kl_per_candidate(torch.randint(0, 5, (4, 10)), torch.randn(8, 10), 2)
    with pytest.raises(ValueError):
        kl_per_candidate(torch.randn(4, 10), torch.randn(8, 10), 2.0)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 4),
    num_classes=st.integers(1, 300),
    k=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_property(n, num_classes, k, dtype, seed):
    torch.manual_seed(seed)
    t, s = _make(n, num_classes, k, dtype)
    _assert_fa_close(kl_per_candidate(t, s, k), t, s, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, num_classes, k", [(64, 1000, 16), (50, 1001, 7), (8, 21843, 3)])
def test_cuda_engine_shapes(n, num_classes, k, dtype):
    t, s = _make(n, num_classes, k, dtype, device="cuda")
    out = kl_per_candidate(t, s, k)
    assert out.is_cuda and out.shape == (k,)
    _assert_fa_close(out, t, s, k, atol_scale=n / 4)  # the score is a sum over n images


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float64_accumulation_of_low_precision_logits(backend, dtype):
    """``accumulate=torch.float64`` (what the UP-ViTs engines pass): small KLs of nearby logits come out to float64
    rounding of the rounded inputs, where float32 accumulation leaves a relative error orders of magnitude larger."""
    t, s = _make(4, 1000, 3, dtype, noise=1e-2)
    out = kl_per_candidate(t, s, 3, backend=backend, accumulate=torch.float64)
    assert out.dtype == torch.float64
    ref = kl_div_ref(t.double(), s.double(), 3)  # the same (rounded) inputs, computed in float64
    assert ((out - ref).abs() / ref).max() < 1e-9
    f32 = kl_per_candidate(t, s, 3, backend=backend)
    assert ((f32.double() - ref).abs() / ref).max() > 1e-7  # what the option is for
