"""In-place compaction (vitprune_fast.compact, csrc/compact.cpp) against ``tensor.index_select(dim, index)``."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitprune_fast import _ext, compact
from vitprune_fast._ext import ENV_DISABLE, extension_available, get_ext, load_error
from vitprune_fast.compact import backend_counts, compact_, compact_many_, last_backend

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
# (shape, dim): odd sizes, leading/trailing dims, negative dims, a zero-size tensor
SHAPES = [
    ((7,), 0),
    ((5, 9), 0),
    ((5, 9), 1),
    ((5, 9), -1),
    ((3, 7, 11), 1),
    ((2, 3, 5, 7), 2),
    ((2, 3, 5, 7), -4),
    ((1, 13, 1), 1),
    ((3, 9, 2), 1),  # 2-element rows: 16-byte rows for 8-byte dtypes
    ((4, 11, 3), -2),  # rows of 3 elements: no typed gather, memmove of short runs
    ((0, 6), 1),
]
PATTERNS = ["start", "end", "all", "single", "first", "last", "runs", "scattered"]
# "ext": C++ memmove path; "chunked": the C++ device (CUDA) algorithm run on CPU with tiny temporaries, both
# multi-row chunks and rows larger than the budget; "torch": extension disabled.
PATHS = ["ext", "chunked-256", "chunked-1", "torch"]


def rand(shape, dtype, device="cpu", gen=None) -> torch.Tensor:
    """Fresh random values (never zeros/aranges that could hide a misplaced slice)."""
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    if dtype == torch.bool:
        return (torch.rand(shape, generator=gen) < 0.5).to(device)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -10**6), min(info.max, 10**6), shape, generator=gen, dtype=dtype).to(device)


def pattern_index(n: int, pattern: str) -> torch.Tensor:
    """A sorted unique index into range(n) of a given shape."""
    g = torch.Generator().manual_seed(n * 31 + len(pattern))
    if pattern == "start":
        idx = range(0, max(1, n // 2))  # identity prefix: nothing moves in block 0
    elif pattern == "end":
        idx = range(n // 2, n)
    elif pattern == "all":
        idx = range(n)
    elif pattern == "single":
        idx = [n // 2]
    elif pattern == "first":
        idx = [0]
    elif pattern == "last":
        idx = [n - 1]
    elif pattern == "runs":  # runs of consecutive kept slices separated by gaps
        idx = [i for i in range(n) if (i // 2) % 2 == 1] or [n - 1]
    else:  # scattered
        keep = torch.rand(n, generator=g) < 0.5
        keep[torch.randint(n, (1,), generator=g)] = True
        idx = keep.nonzero().flatten().tolist()
    return torch.tensor(list(idx), dtype=torch.int64)


@contextlib.contextmanager
def ext_disabled():
    old = os.environ.get(ENV_DISABLE)
    os.environ[ENV_DISABLE] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[ENV_DISABLE]
        else:
            os.environ[ENV_DISABLE] = old


def run_path(path: str, items) -> None:
    """Compact ``items`` through one path and check that path was really taken."""
    if path == "torch":
        with ext_disabled():
            compact_many_(items)
        assert last_backend() in ("torch", "noop")
    elif path.startswith("chunked"):
        compact._run(items, force_chunked=True, chunk_bytes=int(path.split("-")[1]))
        assert last_backend() in ("ext", "noop")
    else:
        compact_many_(items)
        assert last_backend() in ("ext", "noop")


@pytest.fixture(scope="module")
def ext():
    mod = get_ext()
    if mod is None:
        pytest.skip(f"C++ extension could not be loaded or built here: {load_error()}")
    return mod


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", SHAPES, ids=str)
def test_matches_index_select(ext, path, dtype, shape, dim):
    n = shape[dim]
    for pattern in PATTERNS:
        t = rand(shape, dtype)
        index = pattern_index(n, pattern)
        ref = t.index_select(dim, index)
        obj = id(t)
        run_path(path, [(t, dim, index)])
        assert id(t) == obj
        assert t.shape == ref.shape and t.dtype == dtype and t.is_contiguous()
        assert torch.equal(t, ref), pattern
        assert t.untyped_storage().nbytes() == ref.numel() * ref.element_size(), pattern


@pytest.mark.parametrize("path", PATHS)
def test_parameter_identity_and_storage_release(ext, path):
    lin = torch.nn.Linear(300, 200)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    w, b = lin.weight, lin.bias
    old_bytes = w.untyped_storage().nbytes()
    rows, cols = pattern_index(200, "scattered"), pattern_index(300, "runs")
    ref_w = w.detach().index_select(0, rows).index_select(1, cols)
    ref_b = b.detach().index_select(0, rows)
    run_path(path, [(w, 0, rows), (b, 0, rows), (w, 1, cols)])
    assert lin.weight is w and lin.bias is b and opt.param_groups[0]["params"][0] is w
    assert isinstance(w, torch.nn.Parameter) and w.requires_grad
    assert torch.equal(w.detach(), ref_w) and torch.equal(b.detach(), ref_b)
    assert w.untyped_storage().nbytes() == ref_w.numel() * 4 < old_bytes
    # the module and the optimizer keep working on the compacted parameters
    lin.in_features, lin.out_features = len(cols), len(rows)
    lin(torch.randn(4, len(cols))).sum().backward()
    opt.step()
    assert w.grad.shape == w.shape


def test_extension_is_really_used(ext):
    assert extension_available()
    assert ext.PARALLEL, "built without OpenMP: at::parallel_for would run on one thread"
    before = backend_counts()
    t = torch.randn(64, 48)
    ref = t[:, 3::2].clone()
    compact_(t, 1, torch.arange(3, 48, 2))
    assert last_backend() == "ext"
    assert backend_counts()["ext"] == before["ext"] + 1
    assert torch.equal(t, ref)


def test_batch_parallel_many_tensors(ext):
    # enough bytes and tensors for the threaded C++ path; sizes differ a lot (scheduling by size)
    gen = torch.Generator().manual_seed(1)
    items, refs = [], []
    for k in range(40):
        shape = (int(torch.randint(1, 600, (1,), generator=gen)), 17, 1 + k % 7)
        t = rand(shape, DTYPES[k % 4], gen=gen)
        dim = k % 3
        idx = pattern_index(shape[dim], PATTERNS[k % len(PATTERNS)])
        items.append((t, dim, idx))
        refs.append(t.index_select(dim, idx))
    assert sum(t.numel() * t.element_size() for t, _, _ in items) > 2 << 20  # above the C++ serial cutoff
    compact_many_(items)
    assert last_backend() == "ext"
    for (t, _, _), ref in zip(items, refs, strict=True):
        assert torch.equal(t, ref)


def test_refused_tensors_fall_back(ext):
    # non-contiguous, a view sharing its base's storage, a storage offset, a numpy-owned storage
    base = torch.randn(6, 8)
    base_copy = base.clone()
    cases = [torch.randn(8, 6).t(), base[2:], base.view(8, 6), torch.from_numpy(np.random.randn(6, 8))]
    for t in cases:
        assert ext.unsupported_reason(t) != ""
        idx = torch.tensor([0, 2, 5])
        ref = t.index_select(1, idx)
        compact_(t, 1, idx)
        assert last_backend() == "torch"
        assert torch.equal(t, ref)
    assert torch.equal(base, base_copy)  # the views' base is untouched


def test_parameter_with_alias_is_not_moved_under_the_alias(ext):
    # A saved autograd tensor / .data alias shares the storage: the C++ path must not move those bytes.
    p = torch.nn.Parameter(torch.randn(10, 4))
    alias = p.data
    snapshot = alias.clone()
    compact_(p, 0, torch.tensor([1, 7]))
    assert last_backend() == "torch"
    assert torch.equal(alias, snapshot) and torch.equal(p.detach(), snapshot[[1, 7]])


def test_mixed_batch_and_noop(ext):
    a, b = torch.randn(5, 6), torch.randn(6, 5).t()
    ra, rb = a[:, [0, 5]], b[[1, 2]]
    compact_many_([(a, 1, torch.tensor([0, 5])), (b, 0, torch.tensor([1, 2]))])
    assert last_backend() == "mixed"
    assert torch.equal(a, ra) and torch.equal(b, rb)
    c = torch.randn(3, 4)
    ptr = c.data_ptr()
    compact_(c, 1, torch.arange(4))  # keeps everything: nothing moves or reallocates
    assert last_backend() == "noop" and c.data_ptr() == ptr


def test_meta_tensor():
    t = torch.empty(4, 10, 3, device="meta")
    compact_(t, -2, torch.tensor([1, 2, 9]))
    assert t.shape == (4, 3, 3) and t.is_meta
    assert last_backend() == "torch"


def test_index_on_other_device_and_noncontiguous_index(ext):
    t = torch.randn(5, 12)
    idx = torch.arange(24)[::2][:6]  # [0, 2, ..., 10], non-contiguous
    ref = t[:, idx]
    compact_(t, 1, idx)
    assert torch.equal(t, ref)


BAD_INDICES = {
    "unsorted": torch.tensor([3, 1]),
    "duplicate": torch.tensor([1, 1, 2]),
    "out of range": torch.tensor([0, 9]),
    "negative": torch.tensor([-1, 2]),
    "empty": torch.tensor([], dtype=torch.int64),
    "int32": torch.tensor([0, 1], dtype=torch.int32),
    "float": torch.tensor([0.0, 1.0]),
    "bool mask": torch.tensor([True, False, True, False, True, False, True, False, True]),
    "2-D": torch.tensor([[0, 1]]),
    "0-d": torch.tensor(1),
    "list": [0, 1],
}


@pytest.mark.parametrize("path", ["ext", "torch"])
@pytest.mark.parametrize("name", list(BAD_INDICES))
def test_invalid_index_raises_and_leaves_tensor_untouched(monkeypatch, path, name):
    if path == "torch":
        monkeypatch.setenv(ENV_DISABLE, "1")
    t = torch.randn(4, 9)
    p = torch.randn(4, 9)
    t0, p0 = t.clone(), p.clone()
    with pytest.raises(ValueError):
        compact_(t, 1, BAD_INDICES[name])
    # in a batch, a bad item anywhere stops everything before any tensor moves
    with pytest.raises(ValueError, match="item 1"):
        compact_many_([(p, 1, torch.tensor([0, 4])), (t, 1, BAD_INDICES[name])])
    assert torch.equal(t, t0) and torch.equal(p, p0)
    assert t.shape == (4, 9) and p.untyped_storage().nbytes() == p0.numel() * 4


@pytest.mark.parametrize(
    "tensor,dim",
    [(torch.randn(4, 9), 2), (torch.randn(4, 9), -3), (torch.randn(4, 9), 1.0), (torch.tensor(3.0), 0), ("x", 0)],
)
def test_invalid_dim_or_tensor(tensor, dim):
    with pytest.raises(ValueError):
        compact_(tensor, dim, torch.tensor([0]))


def test_second_step_is_checked_against_the_shrunk_shape():
    w = torch.randn(6, 6)
    w0 = w.clone()
    with pytest.raises(ValueError, match="item 1"):  # after keeping 2 rows, row index 4 is out of range
        compact_many_([(w, 0, torch.tensor([1, 3])), (w, 0, torch.tensor([0, 4]))])
    assert torch.equal(w, w0)


def test_cpp_validates_on_its_own(ext):
    # the raw binding must never move bytes of a tensor it should refuse, nor accept a bad index
    t = torch.randn(6, 5)
    t0 = t.clone()
    for bad in (torch.tensor([2, 1]), torch.tensor([0, 6]), torch.tensor([], dtype=torch.int64),
                torch.tensor([0, 1], dtype=torch.int32), torch.tensor([[0, 1]])):
        with pytest.raises(ValueError):
            ext.compact_(t, 0, bad)
    with pytest.raises(ValueError):
        ext.compact_(t, 2, torch.tensor([0]))
    alias = t.view(5, 6)
    with pytest.raises(RuntimeError, match="cannot compact in place: storage is shared"):
        ext.compact_(t, 0, torch.tensor([1]))
    del alias
    with pytest.raises(RuntimeError, match="storage offset"):
        ext.compact_many_([torch.randn(3), torch.randn(8)[2:]], [0, 0], [torch.tensor([0]), torch.tensor([0])])
    assert torch.equal(t, t0)


def test_env_var_disables_extension(monkeypatch):
    monkeypatch.setenv(ENV_DISABLE, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_ext() is None and not extension_available()
    t = torch.randn(3, 4)
    compact_(t, 0, torch.tensor([2]))
    assert last_backend() == "torch" and t.shape == (1, 4)


def test_unavailable_extension_warns_once(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_ext", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setattr(_ext, "_load", lambda: (None, "simulated: no compiler"))
    with pytest.warns(RuntimeWarning, match="C\\+\\+ extension unavailable.*simulated: no compiler"):
        assert get_ext() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert get_ext() is None
        t = torch.randn(5, 2)
        ref = t[[0, 4]]
        compact_(t, 0, torch.tensor([0, 4]))
    assert last_backend() == "torch" and torch.equal(t, ref)


@pytest.mark.slow
def test_jit_build_when_prebuilt_module_is_missing():
    # Hide vitprune_fast._C: _ext must build csrc/compact.cpp with ninja (cached in the torch extensions dir).
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["vitprune_fast._C"] = None  # makes `from . import _C` raise ImportError
        import torch
        warnings.simplefilter("error")
        from vitprune_fast import _ext
        from vitprune_fast.compact import compact_, last_backend
        mod = _ext.get_ext()
        assert mod is not None and mod.__name__ == _ext.JIT_NAME, mod
        assert mod.PARALLEL  # built with OpenMP too
        t = torch.randn(7, 5)
        ref = t[:, [1, 4]]
        compact_(t, 1, torch.tensor([1, 4]))
        assert last_backend() == "ext" and torch.equal(t, ref)
        print("JIT OK", mod.__file__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_DISABLE}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0 and _ext.source_path() is None:
        pytest.skip("csrc/compact.cpp is not available in this installation")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "JIT OK" in res.stdout


@st.composite
def cases(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    dim = draw(st.integers(-ndim, ndim - 1))
    n = shape[dim]
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    dtype = draw(st.sampled_from(DTYPES))
    path = draw(st.sampled_from(["ext", "chunked-1", "chunked-64", "chunked-4096", "torch"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, dim, keep, dtype, path, seed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases())
def test_property_random_shapes(ext, case):
    shape, dim, keep, dtype, path, seed = case
    t = rand(shape, dtype, gen=torch.Generator().manual_seed(seed))
    index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.int64)
    ref = t.index_select(dim, index)
    run_path(path, [(t, dim, index)])
    assert torch.equal(t, ref)
    assert t.untyped_storage().nbytes() == ref.numel() * ref.element_size()


# ----------------------------------------------------------------------------------------------- CUDA path


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_bytes", [0, 1, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", SHAPES, ids=str)
def test_cuda_matches_index_select(ext, chunk_bytes, dtype, shape, dim):
    for pattern in PATTERNS:
        t = rand(shape, dtype, device="cuda")
        index = pattern_index(shape[dim], pattern)
        ref = t.index_select(dim, index.cuda())
        compact._run([(t, dim, index)], chunk_bytes=chunk_bytes)
        assert last_backend() in ("ext", "noop")
        assert t.is_cuda and torch.equal(t, ref), pattern
        assert t.untyped_storage().nbytes() == ref.numel() * ref.element_size()


@pytest.mark.gpu
def test_cuda_parameters_batch_and_bounded_memory(ext):
    lin = torch.nn.Linear(4096, 4096, device="cuda")  # 64 MiB weight
    w, b = lin.weight, lin.bias
    rows, cols = pattern_index(4096, "scattered"), pattern_index(4096, "runs")
    ref_w = w.detach().index_select(0, rows.cuda()).index_select(1, cols.cuda())
    ref_b = b.detach().index_select(0, rows.cuda())
    kept_w = w.numel() * 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    compact_many_([(w, 0, rows), (b, 0, rows), (w, 1, cols)])
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    assert last_backend() == "ext" and lin.weight is w
    assert torch.equal(w.detach(), ref_w) and torch.equal(b.detach(), ref_b)
    # chunk temporaries are ≤ max(4 MiB, 1/16 tensor); the storage shrink reallocates the kept part
    assert peak_extra <= ref_w.numel() * 4 + max(4 << 20, kept_w // 16) + (2 << 20), peak_extra
