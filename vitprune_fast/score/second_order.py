"""The second-order screen of UP-ViTs scores: every attention dim and MLP unit at once, from a few backward passes.

At the unpruned model the gradient of ``KL(q || softmax(z))`` with respect to the logits ``z`` is zero, so removing
candidate ``c`` (logits move by ``dz_c``) costs, to second order,

    s_c ~= 1/2 * sum_images dz_c^T (diag(q) - q q^T) dz_c            (the model's own, *true* Fisher)

``dz_c`` is linearised downstream of the candidate's exact local change: an MLP unit zeroes one input of ``fc2``
(``delta = -a_j``, exactly); an attention dim zeroes q, k and v of one channel of one head, whose output is
recomputed with its own softmax (linearising through the softmax misses saturated heads). Each image's Fisher,
restricted to the span of the classifier's weights (the logits cannot move elsewhere), is factored as
``sum_r u_r u_r^T`` (eigenvectors scaled by the root of their eigenvalue, keeping those that hold all but ``eps`` of
its trace, at most ``max_rank``): ``dz^T F dz = sum_r (u_r^T dz)^2``, and a (batched) backward pass per ``r`` gives
``u_r^T dz`` of every candidate at once through its gradient at the candidate's site (the input of ``fc2``, the
input of the attention's ``proj``). Residual channels change every LayerNorm of the network and are not screened
(the screened engine evaluates them exactly).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..arch import adapter_for
from ..errors import UnsupportedModelError
from ..overrides import replaced_output
from ..space import Group

SCREENED_KINDS = ("attn", "mlp")


def fisher_cotangents(logits: torch.Tensor, classifier: Sequence[torch.Tensor], eps: float = 1e-3,
                      max_rank: int | None = None) -> torch.Tensor:
    """Cotangents ``u`` ``[R, n, C]`` with ``sum_r (u_r^T dz)^2 = dz^T (diag(q) - q q^T) dz`` for every logit change
    ``dz`` in the span of the classifier's columns (up to the ``eps`` share of the trace left out).

    Args:
        logits: ``[n, C]`` teacher logits (q = their softmax).
        classifier: weights ``[C, features]`` of the Linear layer(s) making the logits.
        eps: share of each image's (restricted) Fisher trace that may be left out.
        max_rank: at most this many cotangents (default: as many as the trace criterion needs).
    """
    z = logits.detach()
    acc = torch.float64
    q = torch.softmax(z.to(acc), -1)  # [n, C]
    basis = torch.cat([w.detach().to(acc) for w in classifier], 1) if classifier else torch.eye(z.shape[1], dtype=acc,
                                                                                                 device=z.device)
    qb, r = torch.linalg.qr(basis)  # [C, k]: orthonormal columns spanning the logits' possible moves
    qb = qb[:, r.diagonal().abs() > 1e-10 * r.diagonal().abs().max()]
    fisher = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]  # [n, C, C]
    small = qb.T @ fisher @ qb  # [n, k, k]: F restricted to the span
    lam, vec = torch.linalg.eigh(small)  # ascending
    lam = lam.clamp_min(0).flip(-1)  # [n, k] descending
    vec = vec.flip(-1)
    share = lam.cumsum(-1) / lam.sum(-1, keepdim=True).clamp_min(1e-300)  # [n, k]
    rank = int((share < 1 - eps).sum(-1).max()) + 1
    rank = min(rank, lam.shape[1], max_rank or lam.shape[1])
    u = (qb @ vec[:, :, :rank]) * lam[:, None, :rank].sqrt()  # [n, C, R]
    return u.permute(2, 0, 1).to(logits.dtype).contiguous()  # [R, n, C]


class _Capture:
    """Forward hooks keeping each screened block's tensors: qkv output, proj input, fc2 input."""

    def __init__(self, model: nn.Module, refs, attn_blocks: set[int], mlp_blocks: set[int]):
        self.qkv, self.o, self.a = {}, {}, {}
        pairs = []
        for b in attn_blocks:
            pairs.append((model.get_submodule(refs[b].qkv), self._keep(self.qkv, b)))
        self.pre = []
        for b in attn_blocks:
            self.pre.append(model.get_submodule(refs[b].proj).register_forward_pre_hook(self._keep_in(self.o, b)))
        for b in mlp_blocks:
            self.pre.append(model.get_submodule(refs[b].fc2).register_forward_pre_hook(self._keep_in(self.a, b)))
        self.out = replaced_output(pairs)

    @staticmethod
    def _keep(store, b):
        def fn(out):
            store[b] = out
            return out

        return fn

    @staticmethod
    def _keep_in(store, b):
        def hook(_mod, args):
            store[b] = args[0]

        return hook

    def __enter__(self):
        self.out.__enter__()
        return self

    def __exit__(self, *exc):
        self.out.__exit__(*exc)
        for h in self.pre:
            h.remove()


def second_order_screen(model: nn.Module, images: torch.Tensor, groups: Sequence[Group], *, eps: float = 1e-3,
                        max_rank: int | None = None, dim_chunk: int = 8, rank_bytes: int | None = None,
                        objective=None) -> dict[str, torch.Tensor]:
    """Second-order estimates of the UP-ViTs scores of every candidate of the attention and MLP ``groups``.

    Args:
        model: the model (eval mode; not modified; gradients of its parameters are not touched).
        images: ``[n, C, H, W]`` proxy images (one chunk; sum the results over chunks).
        groups: attn / mlp groups of ``describe(model)`` to screen.
        eps, max_rank: the Fisher factorisation (:func:`fisher_cotangents`). A model that is still far from trained
            (flat softmax, e.g. random init with 1000 classes) needs the full rank ``min(classes, features)``;
            a trained one a few cotangents per image.
        dim_chunk: attention dims whose softmax is recomputed together (bounds memory).
        rank_bytes: memory for the gradients of one backward pass: as many cotangents as fit go through it at once
            (default: an eighth of the free GPU memory on CUDA, 256 MiB on CPU).
        objective: the measure the scores are of (a fitted :class:`~vitprune_fast.score.objective.Objective`; KL of
            the logits by default): its :meth:`~vitprune_fast.score.objective.Objective.cotangents` factor the
            second-order term.

    Returns:
        ``{group name: [size] estimates}``, summed over the images, in the model's dtype.
    """
    adapter = adapter_for(model)
    refs, trunk = adapter.blocks(), adapter.trunk()
    by_path = {r.attn: (i, "attn") for i, r in enumerate(refs)} | {r.mlp: (i, "mlp") for i, r in enumerate(refs)}
    for g in groups:
        if g.kind not in SCREENED_KINDS or g.name not in by_path:
            raise UnsupportedModelError(f"{g.name}: only the attention and MLP groups of blocks are screened")
    attn_blocks = {by_path[g.name][0] for g in groups if g.kind == "attn"}
    mlp_blocks = {by_path[g.name][0] for g in groups if g.kind == "mlp"}
    attn_sorted = sorted(attn_blocks)
    with torch.enable_grad(), _Capture(model, refs, attn_blocks, mlp_blocks) as cap:
        x0 = trunk.prefix(images).detach().requires_grad_(True)
        logits = trunk.run(x0, 0)
        classifier = adapter.classifier_weights()
        u = (fisher_cotangents(logits, classifier, eps, max_rank) if objective is None
             else objective.cotangents(logits, classifier, eps, max_rank))  # [R, n, C]
        sites = [cap.o[b] for b in attn_sorted] + [cap.a[b] for b in sorted(mlp_blocks)]
        n = images.shape[0]
        per_r = sum(t.numel() * t.element_size() for t in sites)  # bytes of one cotangent's gradients
        if rank_bytes is None:
            rank_bytes = torch.cuda.mem_get_info(images.device)[0] // 8 if images.is_cuda else 2 ** 28
        step = max(1, min(len(u), rank_bytes // max(per_r, 1)))
        mlp_sq = {b: 0.0 for b in mlp_blocks}  # sum over r and images of (u_r^T dz)^2 per unit, accumulated
        g_o = {b: [] for b in attn_sorted}  # gradients at the heads' outputs, kept: the attention needs all r at once
        for start in range(0, len(u), step):  # several cotangents per backward pass (vmapped): far fewer launches
            part = u[start:start + step]  # [r, n, C]
            grads = torch.autograd.grad(logits, sites, part, retain_graph=start + step < len(u),
                                        is_grads_batched=True)
            with torch.no_grad():
                for b, g in zip(attn_sorted, grads, strict=False):
                    g_o[b].append(g)
                for b, g in zip(sorted(mlp_blocks), grads[len(attn_sorted):], strict=True):
                    a = cap.a[b].detach()
                    delta = -(g * a).reshape(len(part), n, -1, a.shape[-1]).sum(2)  # [r, n, H]: u^T dz, unit j zeroed
                    mlp_sq[b] = mlp_sq[b] + delta.square().sum((0, 1))
    out = {}
    with torch.no_grad():
        for g in groups:
            b, kind = by_path[g.name]
            if not len(u):  # no cotangent: the objective has no second-order term (a zero classifier at init)
                out[g.name] = torch.zeros(g.size, dtype=logits.dtype, device=logits.device)
            elif kind == "mlp":
                out[g.name] = 0.5 * mlp_sq[b]
            else:
                delta = _attention_deltas(adapter, refs[b], g, cap.qkv[b].detach(), cap.o[b].detach(),
                                          torch.cat(g_o[b]), n, dim_chunk)
                out[g.name] = 0.5 * delta.square().sum((0, 1))
    return out


def _attention_deltas(adapter, ref, group: Group, qkv: torch.Tensor, o: torch.Tensor, g_o: torch.Tensor, n: int,
                      dim_chunk: int) -> torch.Tensor:
    """``u_r^T dz`` of every attention dim: its head's output recomputed without q_d, k_d, v_d, times the gradient.

    Args:
        qkv: ``[B_w, T, 3A]`` the qkv output (B_w = images x windows).
        o: ``[B_w, T, A]`` the heads' outputs (the input of proj), to check the recomputation against.
        g_o: ``[R, B_w, T, A]`` gradients of ``u_r^T z`` with respect to ``o``.

    Returns:
        ``[R, n, A]``.
    """
    attn = adapter.model.get_submodule(ref.attn)
    h, hd = group.num_heads, group.head_dim
    bw, t, _ = qkv.shape
    q, k, v = qkv.reshape(bw, t, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B_w, H, T, hd] each
    scale = attn.scale
    logits = (q * scale) @ k.transpose(-2, -1)  # [B_w, H, T, T]
    bias = adapter.attention_bias(ref, bw)
    if bias is not None:
        logits = logits + bias
    heads = (logits.softmax(-1) @ v).transpose(1, 2).reshape(bw, t, h * hd)
    if not torch.allclose(heads, o, rtol=1e-3, atol=1e-4 * o.abs().max().item()):
        raise UnsupportedModelError(f"{ref.attn}: the attention could not be recomputed from its q, k, v (a variant "
                                    "the screen does not know); use the exact engine")
    g = g_o.reshape(len(g_o), bw, t, h, hd).permute(0, 1, 3, 2, 4)  # [R, B_w, H, T, hd]
    o_heads = o.reshape(bw, t, h, hd).transpose(1, 2)  # [B_w, H, T, hd]
    base = (g * o_heads).sum((-2, -1))  # [R, B_w, H]
    delta = torch.empty(len(g), bw, h, hd, dtype=o.dtype, device=o.device)
    for start in range(0, hd, dim_chunk):
        d = torch.arange(start, min(start + dim_chunk, hd), device=o.device)
        qd, kd = q[..., d].movedim(-1, 0), k[..., d].movedim(-1, 0)  # [D, B_w, H, T]
        s = logits - scale * qd[..., :, None] * kd[..., None, :]  # [D, B_w, H, T, T]: dim d of every head removed
        out = s.softmax(-1) @ v  # [D, B_w, H, T, hd]
        out[torch.arange(len(d), device=o.device), ..., d] = 0  # v_d removed too: that output channel is zero
        delta[..., d] = (torch.einsum("rbhte,xbhte->rbhx", g, out) - base[..., None])  # [R, B_w, H, D]
    per_window = delta.reshape(len(g), bw, h * hd)  # channel h * hd + d
    return per_window.reshape(len(g), n, bw // n, h * hd).sum(2)  # windows of one image summed
