"""UP-ViTs importance scores: KL(q‖p) of the model with one channel (or block unit) removed.

``s_c = Σ_images KL(softmax(teacher) ‖ softmax(model without c))`` at temperature 1, summed over images.
Two engines compute the same numbers:

* ``engine="reference"``: the published method literally — for every candidate, the model with that
  candidate removed (a physically pruned copy for residual channels and MLP units; zeroed q, k, v rows for
  an attention dim, as the published scorer does) runs a full forward over the proxy images.
* ``engine="fast"``: the teacher runs once per image chunk and caches every block's input; a candidate in
  block b reuses the prefix, applies its change to block b only (rank-1 update for an MLP unit, a masked
  qkv for an attention dim) and runs the suffix for K candidates stacked along the batch. Residual
  candidates run with per-candidate masked LayerNorms (statistics over the kept channels), which equals
  removal (README, 'What is exact, and the choices we made').
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import BlockRef, adapter_for, model_output
from ..distributed import dist_info, gather_objects
from ..errors import ConfigError, InputError, PlanError
from ..inputs import check_images
from ..kernels.expand_ln import expand_ln
from ..kernels.utils import HAS_TRITON, resolve_backend
from ..masked import masked_copy
from ..norms import group_norms, masked_norm
from ..overrides import replaced_forward, replaced_input, replaced_linear_output, replaced_output
from ..plan import Plan
from ..progress import stage
from ..prune import prune_
from ..space import PruningSpace, tensor_of
from .objective import FeatureObjective, KLObjective, Objective, objective_for
from .store import ScoreStore, fingerprint

COMPONENTS = ("residual", "attn", "mlp", "blocks")
UNIT_KINDS = ("block", "attn", "mlp", "hybrid")  # whole block i; MSA_i; FFN_i; FFN_i + MSA_{i+1}


@dataclass(frozen=True)
class _Work:
    name: str  # group name or "units.<kind>"
    kind: str  # residual | attn | mlp | unit
    size: int


# ----------------------------------------------------------------------------------------------------- inputs
def _chunks(images, batch_size: int, model: nn.Module) -> list[torch.Tensor]:
    """Proxy images as a list of [n, C, H, W] chunks (a tensor is split; a loader's batches are kept), each checked
    against what ``model`` takes (:func:`vitprune_fast.inputs.check_images`) before any forward."""
    if isinstance(images, torch.Tensor):
        return list(check_images(model, images, "proxy images").split(batch_size))
    if not isinstance(images, Iterable):
        raise InputError(f"images must be a tensor or an iterable of batches, got {type(images).__name__}")
    out = []
    for batch in images:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise InputError("each batch must be an image tensor [n, C, H, W] or a tuple whose first item is one")
        out.append(check_images(model, x, "proxy images"))
    if not out:
        raise InputError("no proxy images: the loader yielded no batches")
    return out


def _work_list(space: PruningSpace, n_blocks: int, components: Sequence[str]) -> list[_Work]:
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise ConfigError(f"components must be a non-empty subset of {COMPONENTS}, got {list(components)}")
    work = [_Work(g.name, g.kind, g.size) for g in space.groups.values() if g.kind in components]
    if "blocks" in components:
        work += [_Work(f"units.{k}", "unit", n_blocks - 1 if k == "hybrid" else n_blocks) for k in UNIT_KINDS]
    return [w for w in work if w.size > 0]


# ------------------------------------------------------------------------------------------------ helpers
def _zero(out: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(out)


def _unit_branches(model: nn.Module, blocks: Sequence[BlockRef], kind: str, i: int) -> list[nn.Module]:
    """Residual branches a block unit removes (UP-ViTs §4): their outputs become zero."""
    if kind == "block":
        parts = [(blocks[i], "attn"), (blocks[i], "mlp")]
    elif kind == "hybrid":  # FFN_i + MSA_{i+1}: a residual unit straddling two blocks
        parts = [(blocks[i], "mlp"), (blocks[i + 1], "attn")]
    else:
        parts = [(blocks[i], kind)]
    # a post-norm branch ends in its norm: the branch is gone when the norm's output is zero (and a block running
    # several attentions / MLPs side by side loses all of that kind)
    return [model.get_submodule(br.branch_output(part)) for ref, part in parts for br in ref.branches()]


def _removal_masks(width: int, cands: torch.Tensor, index_map) -> torch.Tensor:
    """[K, width] bool keep-masks, built on the host: row i drops the entries ``index_map(cands[i])`` maps to."""
    k = len(cands)
    keep = torch.ones(k, width, dtype=torch.bool)
    cols = torch.stack([index_map(c.view(1)) for c in cands])  # [K, entries per candidate]
    keep[torch.arange(k)[:, None], cols] = False
    return keep


def _zeroing(width: int, cands: torch.Tensor, sl, device):
    """A function zeroing, for each of the K candidates stacked along the batch, the entries of its last dim of
    size ``width`` that slice ``sl`` maps the candidate to."""
    keep = _removal_masks(width, cands, sl.indices).to(device, non_blocking=True)  # [K, width]
    k = len(cands)
    return lambda y: y.reshape(k, -1, width).masked_fill(~keep[:, None, :], 0).reshape(y.shape)


def _masked_norm_forwards(norms, cands: torch.Tensor, device, backend: str):
    """(norm, forward) pairs normalising candidate k's rows over what is left without ``cands[k]``.

    Args:
        norms: ``group_norms`` of the group.
        cands: the K candidates; rows of the norm's input are candidate-major (mask row k covers candidate k's rows).
    """

    def forward(norm: nn.Module, mask: torch.Tensor):
        def fn(x):
            return masked_norm(norm, x.reshape(-1, x.shape[-1]), mask, backend=backend).reshape(x.shape)

        return fn

    return [(n, forward(n, _removal_masks(n.weight.shape[0], cands, sl.indices).to(device, non_blocking=True)))
            for n, sl in norms]


def _without_features(out: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """Outputs ``[K * n, F]`` (candidate-major) with candidate k's own output feature ``cands[k]`` zeroed: a removed
    channel of the group the features are (:meth:`~vitprune_fast.arch.Adapter.output_group`)."""
    keep = _removal_masks(out.shape[-1], cands, lambda c: c).to(out.device)
    return out.reshape(len(cands), -1, out.shape[-1]).masked_fill(~keep[:, None, :], 0).reshape(out.shape)


def _reads_tokens(objective) -> bool:
    return bool(getattr(objective, "tokens", False))


def _feature_group(adapter, objective) -> str | None:
    """The group whose channel c is output feature c under ``objective`` (None for KL: logits are no channels)."""
    if not isinstance(objective, FeatureObjective):
        return None
    return adapter.token_group() if _reads_tokens(objective) else adapter.output_group()


def objective_outputs(model: nn.Module, x: torch.Tensor, objective) -> torch.Tensor:
    """What ``objective`` measures of ``model`` on ``x``: the model's output, or its final tokens (the library's
    own call, :meth:`~vitprune_fast.arch.Adapter.model_tokens`)."""
    return adapter_for(model).model_tokens(x) if _reads_tokens(objective) else model_output(model, x)


def _repeat(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.repeat(k, *([1] * (x.dim() - 1)))


# ---------------------------------------------------------------------------------------------- fast engine
class FastEngine:
    """Exact scores with prefix reuse, cheap deltas and candidate batching.

    Args:
        model: the model (eval mode, not modified).
        space: ``describe(model)``.
        max_rows: images × candidates per pass.
        use_kernels: the Triton kernels (fused KL, masked LayerNorm, expansion + LayerNorm) instead of their
            plain-torch references.
        objective: what a candidate's score measures (:mod:`.objective`; default KL of the logits), fitted.
    """

    def __init__(self, model: nn.Module, space: PruningSpace, max_rows: int, use_kernels: bool = False,
                 objective: Objective | None = None):
        adapter = adapter_for(model)
        self.objective = objective or KLObjective()
        self.out_group = _feature_group(adapter, self.objective)
        self.model, self.space = model, space
        self.trunk = adapter.trunk(tokens=_reads_tokens(self.objective))
        self.refs, self.stages = adapter.blocks(), adapter.stages()
        self.embed_modules = adapter.embed_modules()
        self.max_rows = max_rows
        self.backend = "triton" if use_kernels else "torch"
        self._cache_key, self._cache = None, None

    def teacher(self, x: torch.Tensor, key) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self._cache_key != key:
            self._cache, self._cache_key = None, None  # free the previous chunk first
            self._cache, self._cache_key = self.trunk.teacher(x), key
        return self._cache

    def score(self, work: _Work, x: torch.Tensor, key, progress) -> torch.Tensor:
        return self.score_candidates(work, torch.arange(work.size), x, key, progress)

    def score_candidates(self, work: _Work, cands: torch.Tensor, x: torch.Tensor, key,
                         progress=lambda n: None) -> torch.Tensor:
        """Scores of the candidates ``cands`` (indices into the group) on the image chunk ``x`` (cache ``key``)."""
        inputs, logits = self.teacher(x, key)
        k_max = max(1, self.max_rows // x.shape[0])
        fn = {"mlp": self._mlp, "attn": self._attn, "residual": self._residual, "unit": self._unit}[work.kind]
        if work.kind in ("attn", "mlp") and not self._in_block(work.name):
            fn = self._head_part
        out = []
        for start in range(0, len(cands), k_max):
            part = cands[start:start + k_max]
            out.append(fn(work, part, x, inputs, logits))
            progress(len(part))
        return torch.cat(out) if out else torch.zeros(0, dtype=logits.dtype)

    def _suffix_kl(self, y: torch.Tensor, b: int, logits: torch.Tensor, k: int) -> torch.Tensor:
        return self.objective(logits, self.trunk.run(y, b + 1), k, self.backend)

    def _mlp(self, work, cands, x, inputs, logits):
        """Removing hidden unit j changes block b's output by −h_j ⊗ (γ ⊙ W2[:, j]) (exact; h = fc2's input)."""
        trunk, model, b = self.trunk, self.model, self.trunk.block_index(work.name)
        ref = self.refs[b].branch_of(work.name)
        if group_norms(model, self.space.groups[work.name]):  # a sub-norm over the hidden width: not rank-1
            return self._rerun(work, cands, inputs, logits)
        if ref.post_norm:  # the change passes norm2 before the residual: not rank-1 either
            keep = _removal_masks(work.size, cands, lambda c: c).to(inputs[0].device, non_blocking=True)
            k = len(cands)

            def hidden(h):  # fc2's input [K·n, *S, H]: zero each candidate's unit
                return h.reshape(k, -1, work.size).masked_fill(~keep[:, None, :], 0).reshape(h.shape)

            with replaced_input([(model.get_submodule(ref.fc2), hidden)]):
                return self._rerun(work, cands, inputs, logits)
        cap = {}
        fc2 = model.get_submodule(ref.fc2)
        handle = fc2.register_forward_pre_hook(lambda _m, args: cap.setdefault("h", args[0]))
        try:
            y = trunk.block(b, trunk.enter(inputs[b], b))  # [n, *S, D]
        finally:
            handle.remove()
        h = cap["h"].reshape(*y.shape[:-1], -1)  # [n, *S, H]
        idx = cands.to(h.device)
        w = fc2.weight[:, idx].T  # [K, D]
        if ref.ls2 is not None:
            w = w * tensor_of(model, ref.ls2)
        k, n = len(cands), y.shape[0]
        a = h.index_select(-1, idx).movedim(-1, 0)  # [K, n, *S]
        nxt = b + 1  # the next block's norm1 reads this output directly unless a stage entry comes between
        norm = (model.get_submodule(self.refs[nxt].norm1) if nxt < len(trunk.blocks) and nxt not in trunk.stage_start
                else None)
        if not isinstance(norm, nn.LayerNorm):
            norm = None  # the fused expansion + norm kernel is a LayerNorm (an RMSNorm runs in the suffix)
        xs, z = expand_ln(y.reshape(n, -1, y.shape[-1]), a.reshape(k, n, -1).to(y.dtype).contiguous(),
                          w.to(y.dtype).contiguous(), *((norm.weight, norm.bias, norm.eps) if norm else ()),
                          backend=self.backend)  # [K·n, T, D] each
        xs = xs.view(k * n, *y.shape[1:])
        if norm is None:
            return self._suffix_kl(xs, b, logits, k)
        with replaced_forward([(norm, lambda inp: z.view(inp.shape))]):  # norm1 of block b+1 is z already
            return self._suffix_kl(xs, b, logits, k)

    def _attn(self, work, cands, x, inputs, logits):
        """Removing attention dim d zeroes q_d, k_d, v_d: rerun block b with them zeroed per candidate.

        q, k, v are zeroed where they are made: the output rows of the Linears the group slices (a fused qkv, or
        separate q / kv Linears), tapped by weight where timm applies them with ``F.linear`` (BEiT, Swin V2), or at
        the adapter's taps where no Linear output is q, k, v alone (EVA).
        """
        ref = self.refs[self.trunk.block_index(work.name)].branch_of(work.name)
        if ref.taps is not None:
            return self._attn_taps(work, cands, inputs, logits, ref)
        cols = self._zeroed_linear(work, cands, inputs[0].device, dim=1)  # proj's input d (XCA mixes v's dims)
        if not ref.qkv_functional:
            with replaced_input(cols):
                return self._rerun(work, cands, inputs, logits, self._zeroed_linear(work, cands, inputs[0].device))
        with contextlib.ExitStack() as stack:
            for weight, fn in self._zeroed_weight_rows(work, cands, inputs[0].device):
                stack.enter_context(replaced_linear_output(weight, fn))
            stack.enter_context(replaced_input(cols))
            return self._rerun(work, cands, inputs, logits)

    def _attn_taps(self, work, cands, inputs, logits, ref):
        """q and k at the inputs of the q / k norms, v through the attention output (EVA)."""
        a, k = work.size, len(cands)
        g = self.space.groups[work.name]
        h, hd = g.num_heads, g.head_dim
        keep = _removal_masks(a, cands, lambda c: c).to(inputs[0].device, non_blocking=True)  # [K, A]

        def heads(x):  # q / k: [K·n, H, N, hd] -> zero the candidate's (head, dim)
            return x.reshape(k, -1, h, x.shape[-2], hd).masked_fill(~keep.view(k, 1, h, 1, hd), 0).reshape(x.shape)

        def out(x):  # attention output [K·n, N, A]: v_d = 0 makes output d zero
            return x.reshape(k, -1, a).masked_fill(~keep[:, None, :], 0).reshape(x.shape)

        taps = [self.model.get_submodule(p) for p in ref.taps]
        inputs_fns = [(taps[0], heads), (taps[1], heads)]
        if not group_norms(self.model, g):  # a scale-norm is masked (its kept channels) by _rerun instead
            inputs_fns.append((taps[2], out))
        with replaced_input(inputs_fns):
            return self._rerun(work, cands, inputs, logits)

    def _rerun(self, work, cands, inputs, logits, outputs=()):
        """Rerun block b for K candidates stacked along the batch: ``outputs`` replace module outputs per candidate,
        and every norm over the group's channels (scale-norm, MLP sub-norm) normalises over the kept ones."""
        trunk, b, k = self.trunk, self.trunk.block_index(work.name), len(cands)
        norms = _masked_norm_forwards(group_norms(self.model, self.space.groups[work.name]), cands,
                                      inputs[0].device, self.backend)
        with replaced_output(outputs), replaced_forward(norms):
            y = trunk.block(b, _repeat(trunk.enter(inputs[b], b), k))
        return self._suffix_kl(y, b, logits, k)

    def _in_block(self, name: str) -> bool:
        try:
            self.trunk.block_index(name)
        except KeyError:
            return False
        return True

    def _head_part(self, work, cands, x, inputs, logits):
        """A group inside the head (an attention pool's attention or MLP): rerun the head for K candidates with each
        candidate's output rows of the group's Linears zeroed (q, k, v rows; fc1 rows, act(0) = 0)."""
        trunk, k = self.trunk, len(cands)
        last = len(trunk.blocks) - 1
        y = trunk.run(inputs[last], last, last + 1)  # output of the last block
        with contextlib.ExitStack() as stack:
            for weight, fn in self._zeroed_weight_rows(work, cands, y.device, functional_only=True):
                stack.enter_context(replaced_linear_output(weight, fn))  # nn.MultiheadAttention's in_proj_weight
            stack.enter_context(replaced_output(self._zeroed_linear(work, cands, y.device)))
            stack.enter_context(replaced_input(self._zeroed_linear(work, cands, y.device, dim=1)))
            out = trunk.head(_repeat(y, k))
        return self.objective(logits, out, k, self.backend)

    def _zeroed_linear(self, work, cands, device, dim: int = 0) -> list:
        """(Linear, fn) pairs zeroing each candidate's entries of every Linear the group slices along ``dim`` (0:
        its output rows, for :func:`replaced_output`; 1: its input columns, for :func:`replaced_input`); the K
        candidates are stacked along the batch."""
        out = []
        for sl in self.space.groups[work.name].slices:
            path, _, pname = sl.name.rpartition(".")
            lin = self.model.get_submodule(path)
            if pname == "weight" and sl.dim == dim and isinstance(lin, nn.Linear):
                width = lin.out_features if dim == 0 else lin.in_features
                out.append((lin, _zeroing(width, cands, sl, device)))
        return out

    def _zeroed_weight_rows(self, work, cands, device, functional_only: bool = False) -> list:
        """(weight, fn) pairs zeroing each candidate's output rows of every weight matrix the group slices by row,
        for :func:`replaced_linear_output`: a Linear's ``weight``, or one applied functionally (BEiT's fused qkv,
        ``nn.MultiheadAttention``'s ``in_proj_weight``)."""
        out = []
        for sl in self.space.groups[work.name].slices:
            w = tensor_of(self.model, sl.name)
            owner = self.model.get_submodule(sl.name.rpartition(".")[0])
            if functional_only and isinstance(owner, nn.Linear):
                continue
            if sl.name.endswith("weight") and sl.dim == 0 and w.dim() == 2:
                out.append((w, _zeroing(w.shape[0], cands, sl, device)))
        return out

    def _residual(self, work, cands, x, inputs, logits):
        """Residual channel c: every norm the group feeds normalises over the other channels."""
        trunk, model, group = self.trunk, self.model, self.space.groups[work.name]
        lns = group_norms(model, group)
        k = len(cands)
        stage = next(s for s in self.stages if s.residual == group.name)
        # post-norm blocks read the residual stream directly: channel c must stay zero, as removal leaves it -- in
        # the stream entering the stage and from every writer (a stage entry's Linear, proj, fc2); pre-norm blocks
        # read the stream only through the masked norms
        post = any(b.post_norm for b in stage.blocks)
        writers = self._zeroed_linear(work, cands, inputs[0].device) if post else []
        s = stage.blocks[0].index  # the first block whose input carries this group's channels
        readers = [(m, lambda t: _without_features(t, cands)) for m in adapter_for(model).residual_readers(group.name)]
        with replaced_forward(_masked_norm_forwards(lns, cands, inputs[0].device, self.backend)), \
                replaced_output(writers), replaced_input(readers):
            from_images = any(self._in_prefix(ln) for ln, _ in lns)  # e.g. patch_embed.norm: start from the images
            start, s = (trunk.prefix(_repeat(x, k)), 0) if from_images else (_repeat(inputs[s], k), s)
            if post and s not in trunk.stage_start:  # the stream entering block s carries this group's channels
                keep = _removal_masks(work.size, cands, lambda c: c).to(start.device, non_blocking=True)
                start = start.reshape(k, -1, work.size).masked_fill(~keep[:, None, :], 0).reshape(start.shape)
            out = trunk.run(start, s)
        if group.name == self.out_group:  # the model no longer outputs feature c (a norm-free head still would)
            out = _without_features(out, cands)
        return self.objective(logits, out, k, self.backend)

    def _in_prefix(self, ln: nn.Module) -> bool:
        return any(ln is sub for m in self.embed_modules for sub in m.modules())

    def _unit(self, work, cands, x, inputs, logits):
        """Block units: skip a branch (its output becomes zero), the rest of the block still runs."""
        kind = work.name.split(".", 1)[1]
        trunk = self.trunk
        out = []
        for i in cands.tolist():
            if kind == "block":
                y = trunk.run(trunk.enter(inputs[i], i), i + 1)
            else:
                with replaced_output([(m, _zero) for m in _unit_branches(self.model, self.refs, kind, i)]):
                    y = trunk.run(inputs[i], i)
            out.append(self.objective(logits, y, 1, self.backend))
        return torch.cat(out)


# ------------------------------------------------------------------------------------------ reference engine
class ReferenceEngine:
    """The published loop: one full forward of the candidate model (and optionally of the teacher) each."""

    def __init__(self, model: nn.Module, space: PruningSpace, teacher: str = "cached",
                 objective: Objective | None = None):
        if teacher not in ("cached", "recompute"):
            raise ConfigError(f"teacher must be 'cached' or 'recompute', got {teacher!r}")
        self.model, self.space, self.refs, self.teacher_mode = model, space, adapter_for(model).blocks(), teacher
        self.objective = objective or KLObjective()
        self.out_group = _feature_group(adapter_for(model), self.objective)
        self._cache_key, self._logits = None, None

    def score(self, work: _Work, x: torch.Tensor, key, progress) -> torch.Tensor:
        if self.teacher_mode == "cached" and self._cache_key != key:
            self._logits, self._cache_key = objective_outputs(self.model, x, self.objective), key
        out = []
        for c in range(work.size):
            with self._candidate(work, c) as cand:
                student = objective_outputs(cand, x, self.objective)
            teacher = (self._logits if self.teacher_mode == "cached"
                       else objective_outputs(self.model, x, self.objective))
            if student.shape[-1] != teacher.shape[-1] and work.name == self.out_group:  # feature c removed: 0
                student = torch.cat([student[..., :c], torch.zeros_like(student[..., :1]), student[..., c:]], -1)
            out.append(self.objective(teacher, student, 1, "torch"))
            progress(1)
        return torch.cat(out)

    @contextlib.contextmanager
    def _candidate(self, work: _Work, c: int):
        model = self.model
        if work.kind in ("residual", "mlp"):  # true removal: a physically pruned copy
            g = self.space.groups[work.name]
            keep = torch.cat([torch.arange(c), torch.arange(c + 1, g.size)])
            if keep.numel() == 0:
                raise PlanError(f"{work.name} has a single channel; removing it leaves nothing to score")
            plan = Plan.from_space(self.space, {work.name: keep})
            g = self.space.groups[work.name]
            if g.multiple_of > 1 or any(t.tied_to == work.name for t in self.space.groups.values()):
                yield masked_copy(model, plan)  # removal == masking; one channel cannot be removed alone (tied width)
            else:
                yield prune_(copy.deepcopy(model), plan)
        elif work.kind == "attn":  # zero q_d, k_d, v_d (weights and bias) and proj column d, then restore
            g = self.space.groups[work.name]
            saved = []
            norms = group_norms(model, g)  # a scale-norm over the attention width normalises over the other dims
            for sl in g.slices:
                if sl.per_head or any(sl.name.startswith(f"{path}.") for path in _paths(model, norms)):
                    continue
                t = tensor_of(model, sl.name)
                idx = sl.indices(torch.tensor([c])).to(t.device)  # index_select / _fill_ / _copy_: same device
                saved.append((t, sl.dim, idx, t.detach().index_select(sl.dim, idx).clone()))
                t.detach().index_fill_(sl.dim, idx, 0.0)
            try:
                with replaced_forward(_masked_norm_forwards(norms, torch.tensor([c]), _device(model), "torch")):
                    yield model
            finally:
                for t, dim, idx, v in saved:
                    t.detach().index_copy_(dim, idx, v)
        elif work.name == "units.block":  # the block is skipped (with a main-branch norm3, if it has one)
            with replaced_forward([(model.get_submodule(self.refs[c].path), adapter_for(model).skipped_block)]):
                yield model
        else:
            kind = work.name.split(".", 1)[1]
            with replaced_output([(m, _zero) for m in _unit_branches(model, self.refs, kind, c)]):
                yield model


def _paths(model: nn.Module, norms) -> list[str]:
    by_id = {id(m): p for p, m in model.named_modules()}
    return [by_id[id(n)] for n, _ in norms]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------------- driver
def _auto_rows(model: nn.Module, x: torch.Tensor) -> int:
    """Images × candidates per pass: from free GPU memory (measured with a probe pass), 256 on CPU."""
    if not x.is_cuda:
        return 256
    probe = x[: min(4, x.shape[0])]
    model(probe)  # warm-up: autocast's cached low-precision weight copies must not count as per-image memory
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(probe)
    per_row = max(1, (torch.cuda.max_memory_allocated() - base) / probe.shape[0])
    free, _ = torch.cuda.mem_get_info()
    return max(1, int(0.5 * (free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()) / per_row))


def fitted_objective(model: nn.Module, chunks: Sequence[torch.Tensor], objective: str | Objective | None,
                     amp=None) -> Objective:
    """The objective ``objective`` names (None: by the model, :func:`.objective.objective_for`), fitted on the
    model's outputs for every proxy chunk (the features objective's variances; nothing to fit for KL)."""
    obj = objective_for(objective, adapter_for(model).classifier_weights())
    if isinstance(obj, FeatureObjective) and obj.var is None:  # a user's fitted objective is kept as it is
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), amp or contextlib.nullcontext():
                obj.fit([objective_outputs(model, x, obj) for x in chunks])
        finally:
            model.train(was_training)
    return obj


def upvits_scores(
        model: nn.Module,
        images,
        components: Sequence[str] = ("residual", "attn", "mlp"),
        engine: str = "fast",
        batch_size: int = 64,
        max_rows: int | None = None,
        checkpoint: str | None = None,
        progress: bool = True,
        autocast_dtype: torch.dtype | None = None,
        teacher: str = "cached",
        use_kernels: bool | None = None,
        groups: Sequence[str] | None = None,
        objective: str | Objective | None = None,
) -> dict[str, torch.Tensor]:
    """UP-ViTs importance of every channel of the chosen components (higher = more important).

    Args:
        model: timm VisionTransformer / SwinTransformer (used in eval mode; not modified).
        images: proxy images, a float tensor [N, C, H, W] or an iterable of batches (tensors or
            ``(images, labels)`` tuples), already transformed and on the model's device.
        components: any of ``residual`` (C1), ``attn`` (C2), ``mlp`` (C3), ``blocks`` (block units).
        engine: ``"fast"`` (exact, batched) or ``"reference"`` (the published one-forward-per-candidate loop).
        batch_size: images per chunk when ``images`` is a tensor.
        max_rows: images × candidates per pass (fast engine); default from free memory (256 on CPU).
        checkpoint: directory for resumable results: each finished (chunk, group) is saved; a rerun with the
            same model, images and settings continues, a different job is refused.
        progress: ``True``: a progress bar (candidates/s); ``"lines"``: one line on stderr when scoring starts;
            ``False``: nothing; a callable ``(stage, done, total)``: events (:mod:`vitprune_fast.progress`).
        autocast_dtype: e.g. ``torch.bfloat16`` to run under CUDA autocast.
        teacher: reference engine only: ``"cached"`` or ``"recompute"`` (the teacher forward per candidate,
            as the published scripts do).
        use_kernels: fast engine: use the Triton kernels (fused KL, masked LayerNorm, expansion + LayerNorm)
            instead of their plain-torch references. Default: on CUDA when triton is installed. On CPU they need
            ``TRITON_INTERPRET=1`` (tests use that); without triton, ``True`` raises ``KernelUnavailableError``.
        groups: optional subset of group names (and ``units.*`` names) to score.
        objective: what a score measures (:mod:`vitprune_fast.score.objective`): ``"kl"`` (UP-ViTs' KL of the
            logits), ``"features"`` (squared error of the output features over the teacher's per-feature variance on
            the proxy images), ``"tokens"`` (the same over the final tokens, e.g. timm's ``forward_features``) or
            None: KL for a model with a classifier, features for one without (timm ``num_classes=0``).

    Returns:
        ``{group name: [size] scores}`` with group names as in ``describe``; with ``blocks``, also
        ``units.block`` / ``units.attn`` / ``units.mlp`` ([L]) and ``units.hybrid`` ([L-1]: FFN_i + MSA_{i+1}),
        blocks numbered in forward order (Swin: across stages).

    Under torch.distributed (e.g. torchrun, any backend), work units are sharded across ranks and every rank
    returns the full, identical result.
    """
    adapter = adapter_for(model)
    space = adapter.describe()
    if engine not in ("fast", "reference"):
        raise ConfigError(f"engine must be 'fast' or 'reference', got {engine!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    chunks = _chunks(images, batch_size, model)
    work = _work_list(space, len(adapter.blocks()), components)
    if groups is not None:
        unknown = sorted(set(groups) - {w.name for w in work})
        if unknown:
            raise ConfigError(f"groups {unknown[:5]} are not among the scored components' groups")
        work = [w for w in work if w.name in set(groups)]
    was_training = model.training
    model.eval()
    rank, world = dist_info()
    kernels = chunks[0].is_cuda and HAS_TRITON if use_kernels is None else bool(use_kernels)
    if kernels and engine == "fast":
        resolve_backend("triton", chunks[0])  # a clear error now if the kernels cannot run here
    amp = (torch.autocast(chunks[0].device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    obj = fitted_objective(model, chunks, objective, amp)
    settings = {"components": sorted(components), "dtype": str(autocast_dtype), "kernels": kernels,
                "groups": sorted(w.name for w in work)} | obj.settings()
    store = None
    if checkpoint is not None:
        job = fingerprint(model, chunks, settings)
        store = ScoreStore(checkpoint, job, {"model": type(model).__name__, "images": sum(len(c) for c in chunks),
                                             **settings})
    units = [(i, w) for i in range(len(chunks)) for w in work]
    mine = units[rank::world]
    results: dict[str, torch.Tensor] = {}
    pending = [(i, w) for i, w in mine if store is None or not store.has(_key(i, w))]
    for i, w in mine:
        if store is not None and store.has(_key(i, w)):
            results[_key(i, w)] = store.load(_key(i, w))
    try:
        with torch.no_grad(), amp, adapter_for(model).scoring_context():
            if pending:
                rows = max_rows or _auto_rows(model, chunks[0])
                eng = (FastEngine(model, space, rows, kernels, obj) if engine == "fast"
                       else ReferenceEngine(model, space, teacher, obj))
                total = sum(w.size for _, w in pending)
                with stage(progress, f"UP-ViTs {engine}", "exact scores", total) as bar:
                    for i, w in pending:
                        vec = eng.score(w, chunks[i], i, bar.update)
                        results[_key(i, w)] = vec.detach().cpu()
                        if store is not None:
                            store.save(_key(i, w), results[_key(i, w)])
    finally:
        model.train(was_training)
    if world > 1:
        results = {k: v for part in gather_objects(results) for k, v in part.items()}
    scores = {}
    for w in work:  # sum over chunks in a fixed order: identical however the work was split or resumed
        vecs = [results[_key(i, w)] for i in range(len(chunks))]
        scores[w.name] = torch.stack(vecs).sum(0) if len(vecs) > 1 else vecs[0].clone()
    return scores


def _key(i: int, w: _Work) -> str:
    return f"{i:05d}.{w.name}"


__all__ = ["COMPONENTS", "FastEngine", "ReferenceEngine", "UNIT_KINDS", "fitted_objective", "upvits_scores"]
