"""DIMAP/LAMP metric kernel (``vitprune_fast.kernels.dimap_metric``) against its plain-torch reference.

On CPU the Triton kernels run in the interpreter (conftest sets ``TRITON_INTERPRET=1``), so shapes stay small;
the ``gpu`` test repeats the check on CUDA at Swin-B layer sizes. Pass rule for float32 (README, 'Architecture',
kernels):
``|kernel - ref64| <= 2 * |torch_fp32 - ref64| + atol``; float64 must agree to rounding.
"""

import contextlib

import pytest
import torch
from devices import TRITON_DEVICE as DEV
from hypothesis import given, settings
from hypothesis import strategies as st
from vitprune_fast.kernels import dimap_metric as dm
from vitprune_fast.kernels.dimap_metric import dimap_metric, dimap_metric_ref, sort_desc

SHAPES = [(1, 1), (3, 5), (2, 1024), (4, 1025), (2, 3001), (5, 257)]
SHAPE_IDS = ["1x1", "tiny-odd", "one-block", "block+1", "multi-block-odd", "five-rows"]


def _assert_fa_close(out: torch.Tensor, x: torch.Tensor, squared: bool = False, atol: float = 1e-6) -> None:
    ref = dimap_metric_ref(x.double(), squared)
    pt = dimap_metric_ref(x, squared)  # plain torch at the input dtype
    err = (out.double() - ref).abs().max().item()
    err_pt = (pt.double() - ref).abs().max().item()
    assert err <= 2 * err_pt + atol, f"kernel err {err:.3e} > 2 * torch err {err_pt:.3e} + {atol:.1e}"


def _with_zeros(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, : min(3, x.shape[1])] = 0  # a few exact zeros (score 0)
    if x.shape[0] > 1:
        x[-1] = 0  # an all-zero layer: 0 / 0 must give 0
    return x


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_float64_equals_reference(shape):
    x = _with_zeros(torch.randn(shape, dtype=torch.float64, device=DEV))
    out = dimap_metric(x, backend="triton")
    assert out.dtype == torch.float64 and out.shape == x.shape
    torch.testing.assert_close(out, dimap_metric_ref(x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_float32_within_contract(shape):
    x = _with_zeros(torch.randn(shape, device=DEV) * 0.02)
    out = dimap_metric(x, backend="triton")
    assert out.dtype == torch.float32
    _assert_fa_close(out, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_squared_inputs(dtype):
    x = torch.rand(3, 1500, dtype=dtype, device=DEV) ** 3  # group norms²: non-negative, skewed
    out = dimap_metric(x, squared=True, backend="triton")
    if dtype == torch.float64:
        torch.testing.assert_close(out, dimap_metric_ref(x, squared=True), rtol=1e-12, atol=1e-15)
    else:
        _assert_fa_close(out, x, squared=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_accumulate_in_float32(dtype):
    x = torch.randn(2, 700, device=DEV).to(dtype)
    out = dimap_metric(x, backend="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, dimap_metric_ref(x.float()), rtol=1e-5, atol=1e-6)


def test_multi_block_chunks_as_on_gpu(monkeypatch):
    """The GPU configuration (several blocks per program, carry across blocks and chunks) under the interpreter."""
    monkeypatch.setattr(dm, "_pick_chunk", lambda x: 4 * dm._BLOCK)
    x = _with_zeros(torch.randn(3, 4 * dm._BLOCK * 2 + 77, dtype=torch.float64, device=DEV))
    torch.testing.assert_close(dimap_metric(x, backend="triton"), dimap_metric_ref(x), rtol=1e-12, atol=1e-15)


def test_ties_follow_stable_order():
    x = torch.randint(-3, 4, (3, 2100), device=DEV).double()  # many exact ties in |x| and x**2
    ref = dimap_metric_ref(x)
    torch.testing.assert_close(dimap_metric(x, backend="triton"), ref, rtol=1e-12, atol=1e-15)
    assert torch.equal(dimap_metric(x, backend="torch"), ref)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_backend_equals_reference(shape, dtype):
    x = _with_zeros(torch.randn(shape, dtype=dtype))
    assert torch.equal(dimap_metric(x, backend="torch"), dimap_metric_ref(x))
    a = x.abs()
    assert torch.equal(dimap_metric(a, squared=True, backend="torch"), dimap_metric_ref(a, squared=True))


def test_auto_backend_on_cpu_is_torch():
    x = torch.randn(2, 50)
    assert torch.equal(dimap_metric(x), dimap_metric_ref(x))


def test_sort_desc_equals_torch_sort():
    a = torch.randn(4, 999).abs()
    a[:, 10:20] = 0.5  # ties
    for t in (a, a.double(), a.half()):
        v, i = sort_desc(t)
        v_ref, i_ref = torch.sort(t, dim=1, descending=True, stable=True)
        assert torch.equal(v, v_ref) and torch.equal(i, i_ref)


def test_metric_properties():
    x = torch.randn(4, 333, dtype=torch.float64, device=DEV)
    s = dimap_metric(x, backend="triton")
    assert torch.allclose(s.max(1).values, torch.ones(4, dtype=torch.float64, device=DEV))
    assert torch.equal(s.argmax(1), x.abs().argmax(1))
    order = torch.argsort(x.abs(), dim=1, descending=True)
    assert (s.gather(1, order).diff(dim=1) <= 0).all()  # monotone in |x| within a row
    scale = torch.tensor([[3.0], [-0.01], [1e5], [7.0]], dtype=torch.float64, device=DEV)
    torch.testing.assert_close(dimap_metric(x * scale, backend="triton"), s, rtol=1e-12, atol=1e-15)


def test_input_errors():
    with pytest.raises(ValueError, match=r"\[L, N\]"):
        dimap_metric(torch.randn(5))
    with pytest.raises(ValueError, match="floating point"):
        dimap_metric(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        dimap_metric(torch.randn(2, 3), backend="cuda")


def test_triton_launches_on_the_input_device(monkeypatch):
    """Both launches run under the input's device guard (Triton launches on the current GPU)."""
    seen = []

    def guard(x):
        seen.append(x.device)
        return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()

    monkeypatch.setattr(dm, "device_guard", guard)
    monkeypatch.setattr(dm, "_pick_chunk", lambda x: dm._BLOCK)  # several chunks: the chunk-sum launch runs too
    x = torch.randn(2, 3 * dm._BLOCK, device=DEV)
    torch.testing.assert_close(dimap_metric(x, backend="triton"), dimap_metric_ref(x), rtol=1e-5, atol=1e-6)
    assert seen == [x.device]


def test_empty_rows():
    assert dimap_metric(torch.randn(0, 5, device=DEV), backend="triton").shape == (0, 5)
    assert dimap_metric(torch.randn(3, 0), backend="torch").shape == (3, 0)


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 3),
    cols=st.integers(1, 2500),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_matches_reference_hypothesis(rows, cols, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale).to(DEV)
    torch.testing.assert_close(dimap_metric(x, backend="triton"), dimap_metric_ref(x), rtol=1e-12, atol=1e-15)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(36, 512 * 2048), (4, 1024 * 4096 + 3), (96, 192 * 576)])
def test_gpu_swin_b_sizes(shape):
    x = torch.randn(shape, device="cuda") * 0.02
    out = dimap_metric(x)  # auto -> Triton on CUDA
    _assert_fa_close(out, x, atol=1e-6)
    x64 = x.double()
    torch.testing.assert_close(dimap_metric(x64), dimap_metric_ref(x64), rtol=1e-11, atol=1e-14)
