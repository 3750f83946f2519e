"""Candidate expansion fused with LayerNorm (``vitprune_fast.kernels.expand_ln``) against float64 references.

Pass rule (FlashAttention style; README, 'Architecture', kernels):
``|kernel - ref64| <= 2 * |torch_same_dtype - ref64| + atol``,
applied to both outputs. The Triton CPU interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to
nearest), so interpreter bf16 outputs can be one bf16 ulp off; the rule's factor 2 and bf16 atol cover it.
"""

import pytest
import torch
import torch.nn.functional as F
from devices import TRITON_DEVICE
from vitprune_fast.kernels.expand_ln import expand_ln, expand_ln_ref

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _make(k, n, t, d, dtype, device="cpu"):
    """Shared block output y, GELU-like coefficients a, directions w and LN params; never zero."""
    f64 = dict(dtype=torch.float64, device=device)
    y = torch.randn(n, t, d, **f64) * 2 + 0.3
    a = F.gelu(torch.randn(k, n, t, **f64) * 1.5) + 0.01
    w = torch.randn(k, d, **f64) * 0.5
    lw = 1 + 0.3 * torch.randn(d, **f64)
    lb = 0.2 * torch.randn(d, **f64)
    return tuple(v.to(dtype) for v in (y, a, w, lw, lb))


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_fa_close(out, ref64, pt, dtype, what):
    err, err_pt = _err(out, ref64), _err(pt, ref64)
    assert err <= 2 * err_pt + ATOL[dtype], f"{what}: kernel err {err:.3e} > 2 * torch err {err_pt:.3e} + atol"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k, n, t, d", [(3, 2, 197, 192), (2, 3, 197, 100), (2, 1, 50, 768), (4, 2, 1, 33)], ids=str)
def test_matches_fp64_reference(k, n, t, d, dtype):
    y, a, w, lw, lb = _make(k, n, t, d, dtype)
    x, z = expand_ln(y, a, w, lw, lb, eps=1e-6)
    assert x.shape == z.shape == (k * n, t, d)
    assert x.dtype == z.dtype == dtype
    x64, z64 = expand_ln_ref(y, a, w, lw, lb, eps=1e-6, compute_dtype=torch.float64)
    xpt, zpt = expand_ln_ref(y, a, w, lw, lb, eps=1e-6)  # plain torch at this dtype
    _assert_fa_close(x, x64, xpt, dtype, "residual")
    _assert_fa_close(z, z64, zpt, dtype, "layernorm")


def test_sign_convention_and_candidate_major_layout():
    # x[k * n + i] = y[i] - a[k, i] (outer) w[k]: removing a unit subtracts its contribution.
    k, n, t, d = 3, 2, 5, 8
    y = torch.randn(n, t, d, dtype=torch.float64)
    a = torch.zeros(k, n, t, dtype=torch.float64)
    a[1, 0, 2] = 2.0
    w = torch.eye(k, d, dtype=torch.float64)
    x, _ = expand_ln(y, a, w)
    expect = y.repeat(k, 1, 1)
    expect[1 * n + 0, 2, 1] -= 2.0
    torch.testing.assert_close(x, expect, rtol=0, atol=0)


def test_equals_mlp_with_hidden_unit_removed():
    # End to end on a LayerScale'd residual MLP: y = r + gamma * fc2(gelu(fc1(norm2(r)))). Dropping hidden
    # unit j (fc1 row j, fc2 column j) must give exactly the expanded candidate and its next-block norm1.
    torch.manual_seed(1)
    n, t, d, hidden = 2, 197, 100, 64
    f64 = dict(dtype=torch.float64)
    r = torch.randn(n, t, d, **f64)
    fc1, fc2 = torch.nn.Linear(d, hidden).double(), torch.nn.Linear(hidden, d).double()
    norm2, norm1_next = torch.nn.LayerNorm(d, eps=1e-6).double(), torch.nn.LayerNorm(d, eps=1e-6).double()
    with torch.no_grad():
        for p in (norm2.weight, norm2.bias, norm1_next.weight, norm1_next.bias):
            p.add_(0.2 * torch.randn_like(p))
        gamma = 0.1 + torch.rand(d, **f64)
        act = F.gelu(fc1(norm2(r)))  # [n, t, hidden]
        y = r + gamma * fc2(act)
        units = [0, 17, 63]
        a = act[..., units].permute(2, 0, 1)  # [K, n, t]
        w = (gamma[:, None] * fc2.weight[:, units]).t()  # [K, D]
        x, z = expand_ln(y, a, w, norm1_next.weight, norm1_next.bias, eps=norm1_next.eps)
        for c, j in enumerate(units):
            keep = torch.ones(hidden, **f64)
            keep[j] = 0
            y_j = r + gamma * fc2(act * keep)
            torch.testing.assert_close(x[c * n : (c + 1) * n], y_j, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(z[c * n : (c + 1) * n], norm1_next(y_j), rtol=1e-10, atol=1e-10)


def test_two_dim_rows_and_no_affine():
    y, a, w, _, _ = _make(3, 7, 1, 100, torch.float32)
    y2, a2 = y[:, 0], a[:, :, 0]  # y [n, D], a [K, n]
    x, z = expand_ln(y2, a2, w)
    assert x.shape == z.shape == (21, 100)
    x64, z64 = expand_ln_ref(y2, a2, w, compute_dtype=torch.float64)
    torch.testing.assert_close(x.double(), x64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), z64, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_bf16_stream_fp32_params():
    y, a, w, lw, lb = _make(2, 2, 197, 192, torch.bfloat16)
    w32, lw32, lb32 = w.float(), lw.float(), lb.float()
    x, z = expand_ln(y, a, w32, lw32, lb32)
    assert x.dtype == z.dtype == torch.bfloat16
    x64, z64 = expand_ln_ref(y, a, w32, lw32, lb32, compute_dtype=torch.float64)
    xpt, zpt = expand_ln_ref(y, a, w, lw, lb)
    _assert_fa_close(x, x64, xpt, torch.bfloat16, "residual")
    _assert_fa_close(z, z64, zpt, torch.bfloat16, "layernorm")


def test_strided_inputs():
    y, a, w, lw, lb = _make(2, 2, 9, 100, torch.float32)
    wide = torch.randn(2, 9, 120)
    wide[..., :100] = y
    y_view = wide[..., :100]
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous a
    got = expand_ln(y_view, a_t, w, lw, lb)
    want = expand_ln(y, a, w, lw, lb)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_non_contiguous_layernorm_params():
    """The kernel reads the LayerNorm weight and bias as dense [D] arrays: strided views give the same result."""
    y, a, w, lw, lb = _make(2, 2, 9, 100, torch.float32, device=TRITON_DEVICE)
    lw_view = torch.stack([lw, -lw], 1).reshape(-1)[::2]  # stride 2, same values
    lb_view = torch.stack([lb, -lb], 1).reshape(-1)[::2]
    assert not lw_view.is_contiguous() and torch.equal(lw_view, lw)
    got = expand_ln(y, a, w, lw_view, lb_view, backend="triton")
    want = expand_ln(y, a, w, lw, lb, backend="triton")
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    y, a, w, lw, lb = _make(2, 2, 10, 100, torch.bfloat16)
    x, z = expand_ln(y, a, w, lw, lb)
    assert x.dtype == z.dtype == torch.bfloat16
    x64, z64 = expand_ln_ref(y, a, w, lw, lb, compute_dtype=torch.float64)
    xpt, zpt = expand_ln_ref(y, a, w, lw, lb)
    _assert_fa_close(x, x64, xpt, torch.bfloat16, "residual")
    _assert_fa_close(z, z64, zpt, torch.bfloat16, "layernorm")


@pytest.mark.parametrize(
    "y_shape, a_shape, w_shape, ln_shape",
    [
        ((2, 5, 8), (3, 2, 4), (3, 8), (8,)),  # a does not match y's rows
        ((2, 5, 8), (3, 2, 5), (2, 8), (8,)),  # K differs between a and w
        ((2, 5, 8), (3, 2, 5), (3, 9), (8,)),  # w's D differs
        ((2, 5, 8), (3, 2, 5), (3, 8), (9,)),  # LayerNorm params' D differs
        ((8,), (3,), (3, 8), (8,)),  # y without a row dim
        ((2, 5, 8), (3, 2, 5), (3, 8, 1), (8,)),  # w not 2-D
        ((2, 5, 8), (0, 2, 5), (0, 8), (8,)),  # no candidates
    ],
)
def test_invalid_shapes_raise(y_shape, a_shape, w_shape, ln_shape):
    with pytest.raises(ValueError):
        expand_ln(torch.randn(y_shape), torch.randn(a_shape), torch.randn(w_shape), torch.randn(ln_shape))


def test_invalid_types_raise():
    with pytest.raises(ValueError):
        expand_ln(torch.randn(2, 5, 8), torch.randint(0, 3, (3, 2, 5)), torch.randn(3, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k, n, t, d", [(16, 8, 197, 768), (32, 8, 197, 192), (5, 3, 197, 100), (2, 2, 7, 5000)])
def test_cuda_engine_shapes(k, n, t, d, dtype):
    y, a, w, lw, lb = _make(k, n, t, d, dtype, device="cuda")
    x, z = expand_ln(y, a, w, lw, lb, eps=1e-6)
    assert x.is_cuda and z.is_cuda
    x64, z64 = expand_ln_ref(y, a, w, lw, lb, eps=1e-6, compute_dtype=torch.float64)
    xpt, zpt = expand_ln_ref(y, a, w, lw, lb, eps=1e-6)
    _assert_fa_close(x, x64, xpt, dtype, "residual")
    _assert_fa_close(z, z64, zpt, dtype, "layernorm")
