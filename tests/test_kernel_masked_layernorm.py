"""Masked LayerNorm (``vitprune_fast.kernels.masked_layernorm``) against float64 references.

Pass rule (FlashAttention style; README, 'Architecture', kernels):
``|kernel - ref64| <= 2 * |torch_same_dtype - ref64| + atol``.
Note: the Triton CPU interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest), so interpreter
bf16 outputs can be one bf16 ulp off instead of half an ulp; the rule's factor 2 and bf16 atol cover it.
"""

import pytest
import torch
import torch.nn.functional as F
from devices import TRITON_DEVICE
from vitprune_fast.kernels import layernorm_common
from vitprune_fast.kernels.layernorm_common import launch_config
from vitprune_fast.kernels.masked_layernorm import masked_layer_norm, masked_layer_norm_ref

ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _make(s, rows, d, dtype, device="cpu", keep_frac=0.7):
    """x rows grouped by sample (mean offset, never zero), a random keep-mask with >= 1 kept channel, LN params."""
    x = (torch.randn(s * rows, d, dtype=torch.float64, device=device) * 2 + 0.5).to(dtype)
    mask = torch.rand(s, d, device=device) < keep_frac
    mask[:, 0] = True
    w = (1 + 0.3 * torch.randn(d, dtype=torch.float64, device=device)).to(dtype)
    b = (0.2 * torch.randn(d, dtype=torch.float64, device=device)).to(dtype)
    return x, mask, w, b


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _assert_fa_close(out, ref64, pt, dtype):
    err, err_pt = _err(out, ref64), _err(pt, ref64)
    assert err <= 2 * err_pt + ATOL[dtype], f"kernel err {err:.3e} > 2 * torch err {err_pt:.3e} + {ATOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s, rows, d", [(3, 197, 192), (2, 197, 100), (2, 50, 768), (3, 5, 7)])
def test_matches_fp64_reference(s, rows, d, dtype):
    x, mask, w, b = _make(s, rows, d, dtype)
    out = masked_layer_norm(x, mask, w, b, eps=1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    ref = masked_layer_norm_ref(x, mask, w, b, eps=1e-6, compute_dtype=torch.float64)
    pt = masked_layer_norm_ref(x, mask, w, b, eps=1e-6)
    _assert_fa_close(out, ref, pt, dtype)
    removed = ~mask.repeat_interleave(rows, dim=0)
    assert (out[removed] == 0).all(), "removed channels must be exactly 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_equals_layernorm_of_physically_pruned_rows(dtype):
    # The point of the op: a model with the channels removed normalises over the kept ones only.
    s, rows, d = 3, 197, 192
    x, mask, w, b = _make(s, rows, d, dtype, keep_frac=0.4)
    out = masked_layer_norm(x, mask, w, b, eps=1e-6)
    for i in range(s):
        keep = mask[i]
        xs = x[i * rows : (i + 1) * rows]
        ref = F.layer_norm(xs[:, keep].double(), (int(keep.sum()),), w[keep].double(), b[keep].double(), 1e-6)
        pt = F.layer_norm(xs[:, keep], (int(keep.sum()),), w[keep], b[keep], 1e-6)
        _assert_fa_close(out[i * rows : (i + 1) * rows][:, keep], ref, pt, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_kept_is_layer_norm(dtype):
    x, _, w, b = _make(2, 197, 100, dtype)
    mask = torch.ones(2, 100, dtype=torch.bool)
    out = masked_layer_norm(x, mask, w, b, eps=1e-5)
    ref = F.layer_norm(x.double(), (100,), w.double(), b.double(), 1e-5)
    pt = F.layer_norm(x, (100,), w, b, 1e-5)  # torch's own LayerNorm at this dtype
    _assert_fa_close(out, ref, pt, dtype)


def test_one_kept_channel_gives_bias():
    # A single kept channel: x - mean = 0, so the output is exactly the bias there and 0 elsewhere.
    x, _, w, b = _make(2, 9, 100, torch.float32)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0, 17] = True
    mask[1, 99] = True
    out = masked_layer_norm(x, mask, w, b, eps=1e-6)
    expect = torch.zeros_like(x)
    expect[:9, 17] = b[17]
    expect[9:, 99] = b[99]
    assert torch.equal(out, expect)


def test_no_kept_channel_gives_zeros():
    x, mask, w, b = _make(2, 4, 33, torch.float32)
    mask[1] = False
    out = masked_layer_norm(x, mask, w, b)
    assert torch.isfinite(out).all()
    assert (out[4:] == 0).all()
    torch.testing.assert_close(out[:4], masked_layer_norm(x[:4], mask[:1], w, b))


def test_mask_forms_and_leading_dims():
    # [S * n, T, D] input, one mask row per sample covering n * T rows; uint8 == bool; a [D] mask == [1, D].
    s, n, t, d = 2, 3, 197, 100
    x, mask, w, b = _make(s, n * t, d, torch.float32)
    out2d = masked_layer_norm(x, mask, w, b)
    out3d = masked_layer_norm(x.view(s * n, t, d), mask, w, b)
    assert out3d.shape == (s * n, t, d)
    torch.testing.assert_close(out3d.reshape(-1, d), out2d, rtol=0, atol=0)
    torch.testing.assert_close(masked_layer_norm(x, mask.to(torch.uint8) * 7, w, b), out2d, rtol=0, atol=0)
    torch.testing.assert_close(masked_layer_norm(x, mask.to(torch.int64) * 256, w, b), out2d, rtol=0, atol=0)
    shared = masked_layer_norm(x, mask[0], w, b)
    torch.testing.assert_close(shared, masked_layer_norm(x, mask[:1], w, b), rtol=0, atol=0)


def test_without_affine_and_strided_input():
    x, mask, w, b = _make(2, 20, 100, torch.float32)
    ref = masked_layer_norm_ref(x, mask, compute_dtype=torch.float64)
    torch.testing.assert_close(masked_layer_norm(x, mask).double(), ref, rtol=1e-5, atol=1e-5)
    only_w = masked_layer_norm_ref(x, mask, weight=w, compute_dtype=torch.float64)
    torch.testing.assert_close(masked_layer_norm(x, mask, weight=w).double(), only_w, rtol=1e-5, atol=1e-5)
    wide = torch.randn(40, 130)
    wide[:, 10:110] = x
    torch.testing.assert_close(masked_layer_norm(wide[:, 10:110], mask, w, b), masked_layer_norm(x, mask, w, b))


def test_non_contiguous_weight_and_bias():
    """The kernel reads weight and bias as dense [D] arrays: strided views must give the contiguous result."""
    x, mask, w, b = _make(2, 20, 100, torch.float32, device=TRITON_DEVICE)
    w_view = torch.stack([w, -w], 1).reshape(-1)[::2]  # every other element: stride 2, same values as w
    b_view = torch.stack([b, -b], 1).reshape(-1)[::2]
    assert not w_view.is_contiguous() and torch.equal(w_view, w)
    got = masked_layer_norm(x, mask, w_view, b_view, backend="triton")
    torch.testing.assert_close(got, masked_layer_norm(x, mask, w, b, backend="triton"), rtol=0, atol=0)


def test_launch_config_warps_grow_with_the_tile(monkeypatch):
    """4 warps only for small tiles; 8 for the usual 4096-element tile (D = 768 etc.), 16 from 8192 elements."""
    monkeypatch.setattr(layernorm_common, "interpreting", lambda: False)  # the GPU's tile sizes
    warps = {d: launch_config(4096, d, None, None, torch.float32)[1]["num_warps"] for d in (128, 1024, 8192, 16384)}
    assert warps == {128: 8, 1024: 8, 8192: 16, 16384: 16}
    assert launch_config(2, 64, None, None, torch.float32)[1]["num_warps"] == 4  # two rows: a 128-element tile


def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, mask, w, b = _make(2, 10, 100, torch.bfloat16)
    out = masked_layer_norm(x, mask, w, b)
    assert out.dtype == torch.bfloat16
    ref = masked_layer_norm_ref(x, mask, w, b, compute_dtype=torch.float64)
    _assert_fa_close(out, ref, masked_layer_norm_ref(x, mask, w, b), torch.bfloat16)


@pytest.mark.parametrize(
    "x_shape, mask_shape, w_shape",
    [
        ((12, 10), (3, 11), (10,)),  # mask D differs
        ((10, 10), (3, 10), (10,)),  # rows not a multiple of samples
        ((12, 10), (3, 10), (11,)),  # weight shape
        ((12, 10), (3, 2, 10), (10,)),  # mask not [S, D] / [D]
        ((12, 0), (3, 0), (0,)),  # no channels
    ],
)
def test_invalid_shapes_raise(x_shape, mask_shape, w_shape):
    with pytest.raises(ValueError):
        masked_layer_norm(torch.randn(x_shape), torch.ones(mask_shape, dtype=torch.bool), torch.randn(w_shape))


def test_invalid_types_raise():
    with pytest.raises(ValueError):
        masked_layer_norm(torch.randn(12, 10), torch.ones(3, 10))  # float mask is ambiguous
    with pytest.raises(ValueError):
        masked_layer_norm(torch.randint(0, 3, (12, 10)), torch.ones(3, 10, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s, rows, d", [(8, 16 * 197, 768), (4, 8 * 197, 192), (3, 7 * 197, 100), (2, 64, 5000)])
def test_cuda_engine_shapes(s, rows, d, dtype):
    x, mask, w, b = _make(s, rows, d, dtype, device="cuda")
    out = masked_layer_norm(x, mask, w, b, eps=1e-6)
    assert out.is_cuda
    ref = masked_layer_norm_ref(x, mask, w, b, eps=1e-6, compute_dtype=torch.float64)
    _assert_fa_close(out, ref, masked_layer_norm_ref(x, mask, w, b, eps=1e-6), dtype)
    assert (out[~mask.repeat_interleave(rows, dim=0)] == 0).all()
