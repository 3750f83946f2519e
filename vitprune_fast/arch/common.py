"""Helpers shared by the architecture adapters."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..norms import is_affine_norm, is_norm, is_rms_norm
from ..space import Group, PruningSpace, TensorSlice

QRows = list[tuple[torch.Tensor, slice]]  # what Adapter.q_rows returns: (tensor, its rows along dim 0 that make q)


def is_layernorm(m: nn.Module) -> bool:
    """timm uses nn.LayerNorm and subclasses of it (timm.layers.LayerNorm)."""
    return isinstance(m, nn.LayerNorm)


def norm_slices(model: nn.Module, path: str, repeats: int = 1, stride: int = 0) -> list[TensorSlice]:
    """Slices of a LayerNorm / RMSNorm at ``path`` (nothing for Identity); anything else is an error."""
    m = model.get_submodule(path)
    if isinstance(m, nn.Identity):
        return []
    if not is_affine_norm(m):
        raise UnsupportedModelError(f"{path}: {type(m).__name__} is not an affine LayerNorm or RMSNorm; cannot prune "
                                    "its width")
    out = [TensorSlice(f"{path}.weight", 0, repeats, stride)]
    if getattr(m, "bias", None) is not None:
        out.append(TensorSlice(f"{path}.bias", 0, repeats, stride))
    return out


def linear_slices(model: nn.Module, path: str, side: str, repeats: int = 1, stride: int = 0) -> list[TensorSlice]:
    """Slices of an nn.Linear at ``path``: ``side="out"`` rows (+ bias), ``side="in"`` input columns."""
    m = model.get_submodule(path)
    if not isinstance(m, nn.Linear):
        raise UnsupportedModelError(f"{path}: expected nn.Linear, found {type(m).__name__}")
    if side == "in":
        return [TensorSlice(f"{path}.weight", 1, repeats, stride)]
    out = [TensorSlice(f"{path}.weight", 0, repeats, stride)]
    if m.bias is not None:
        out.append(TensorSlice(f"{path}.bias", 0, repeats, stride))
    return out


def check_conv_embed_and_head(model: nn.Module) -> None:
    """A Conv2d patch embedding (``patch_embed.proj``) and a Linear or Identity ``head``, or a clear error."""
    if not isinstance(model.patch_embed.proj, nn.Conv2d):
        raise UnsupportedModelError("patch_embed.proj must be a Conv2d")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        raise UnsupportedModelError(f"head: {type(model.head).__name__} is not supported")


def conv_out_slices(model: nn.Module, path: str) -> list[TensorSlice]:
    """Output channel (and bias) of the conv at ``path``: what a residual channel removes from a patch embedding."""
    out = [TensorSlice(f"{path}.weight", 0)]
    if model.get_submodule(path).bias is not None:
        out.append(TensorSlice(f"{path}.bias", 0))
    return out


def patch_embed_slices(model: nn.Module) -> list[TensorSlice]:
    """What a residual channel removes from a conv patch embedding: its output channel (and bias), its norm's."""
    return conv_out_slices(model, "patch_embed.proj") + norm_slices(model, "patch_embed.norm")


def qkv_bias_slices(model: nn.Module, attn: str) -> list[TensorSlice]:
    """The separate q / k / v biases (k: a zero buffer) an attention at ``attn`` adds to its fused qkv (EVA, BEiT,
    Swin V2): one entry per attention dim each."""
    m = model.get_submodule(attn)
    return [TensorSlice(f"{attn}.{b}", 0) for b in ("q_bias", "k_bias", "v_bias") if getattr(m, b, None) is not None]


def has_parameter(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has an ``nn.Parameter`` at the dotted ``name`` (``gamma_1``, ``ls1.gamma``)."""
    try:
        module.get_parameter(name)
    except AttributeError:  # no such module or attribute, or one that is None / not a Parameter
        return False
    return True


def token_slices(model: nn.Module, names: tuple[str, ...]) -> list[TensorSlice]:
    """The ``[1, N, C]`` token / position tensors of ``model`` named in ``names`` (absent or None ones skipped)."""
    return [TensorSlice(t, 2) for t in names if getattr(model, t, None) is not None]


def check_block_norms(block: nn.Module, where: str, names: tuple[str, ...] = ("norm1", "norm2"),
                      accept: Callable[[nn.Module], bool] = is_norm,
                      message: str = "{where}.{name}: {type} is not supported") -> None:
    """The norms in front of a block's branches are ones ``accept`` takes (LayerNorm / RMSNorm by default).

    Args:
        block: the block module, at path ``where``.
        names: the norms' paths relative to the block.
        accept: which modules are supported.
        message: the error, formatted with ``where``, ``name`` and ``type`` (the module's class name).

    Raises:
        UnsupportedModelError: the first norm ``accept`` refuses.
    """
    for name in names:
        m = block.get_submodule(name)
        if not accept(m):
            raise UnsupportedModelError(message.format(where=where, name=name, type=type(m).__name__))


def prenorm_residual_slices(model: nn.Module, path: str, gammas: tuple[str, ...] = (),
                            inputs: tuple[str, ...] = ("attn.qkv",), norms: tuple[str, ...] = ("norm1", "norm2"),
                            attn: str = "attn", mlp: str = "mlp") -> list[TensorSlice]:
    """What a residual channel removes from the pre-norm block at ``path`` (paths below relative to it).

    In this order: the weights of ``norms``; the input columns of the Linears in ``inputs`` (the attention's q / k /
    v projections); the output rows of ``{attn}.proj``; the MLP's input columns and its ``fc2`` output rows; the
    layer-scale parameters in ``gammas`` the block has.
    """
    res = [s for n in norms for s in norm_slices(model, f"{path}.{n}")]
    res += [s for n in inputs for s in linear_slices(model, f"{path}.{n}", "in")]
    res += linear_slices(model, f"{path}.{attn}.proj", "out")
    res += mlp_input_slices(model, f"{path}.{mlp}") + linear_slices(model, f"{path}.{mlp}.fc2", "out")
    blk = model.get_submodule(path)
    return res + [TensorSlice(f"{path}.{g}", 0) for g in gammas if has_parameter(blk, g)]


def fused_qkv_rows(model: nn.Module, attn: str) -> list[TensorSlice]:
    """The slices of attention dim d of an attention at ``attn`` with a fused ``qkv`` Linear: its rows d, A + d and
    2A + d, and the separate q / k / v biases some families add to it (:func:`qkv_bias_slices`)."""
    a = model.get_submodule(f"{attn}.qkv").out_features // 3
    return linear_slices(model, f"{attn}.qkv", "out", repeats=3, stride=a) + qkv_bias_slices(model, attn)


def separate_qkv_rows(model: nn.Module, attn: str, projs: tuple[str, ...] = ("q", "k", "v")) -> list[TensorSlice]:
    """The slices of attention dim d of an attention at ``attn`` with one Linear per projection (``projs``): row d
    of each."""
    return [s for n in projs for s in linear_slices(model, f"{attn}.{n}", "out")]


def attn_group(model: nn.Module, path: str, width: int, rows: list[TensorSlice], *,
               tables: tuple[TensorSlice, ...] = (), head_dim: int | None = None, **fields) -> Group:
    """The ``attn`` group of the attention module at ``path`` (its name and module).

    Args:
        width: the attention width A (the group's size).
        rows: the slices of attention dim d up to the output projection (q / k / v rows, a scale-norm).
        tables: per-head tensors, listed after the output projection's input columns.
        head_dim: the group's head size; ``width / num_heads`` of the module by default.
        **fields: any other :class:`~vitprune_fast.space.Group` field (``tied_to``, ``whole_heads``).
    """
    heads = model.get_submodule(path).num_heads
    return Group(path, "attn", width, rows + linear_slices(model, f"{path}.proj", "in") + list(tables),
                 num_heads=heads, head_dim=width // heads if head_dim is None else head_dim, module=path, **fields)


def mlp_group(model: nn.Module, path: str) -> Group:
    """The ``mlp`` group of the MLP at ``path`` (its name and module): one unit per input channel of ``fc2``."""
    return Group(path, "mlp", model.get_submodule(path).fc2.in_features, mlp_slices(model, path), module=path)


def residual_tail(model: nn.Module, groups: dict[str, Group], heads: tuple[str, ...] = ("head",)) -> list[TensorSlice]:
    """What a residual channel removes after the last block of a one-stage model: the final ``norm``, then an
    attention pool (``attn_pool``: its groups are added to ``groups``, its output width is its own) or ``fc_norm``
    and the input columns of the Linear ``heads``."""
    res = norm_slices(model, "norm")
    if getattr(model, "attn_pool", None) is not None:
        return res + attn_pool_groups(model, "attn_pool", groups)
    if getattr(model, "fc_norm", None) is not None:
        res += norm_slices(model, "fc_norm")
    for head in heads:
        if isinstance(getattr(model, head, None), nn.Linear):
            res += linear_slices(model, head, "in")
    return res


def sync_single_stage_width(model: nn.Module, width: int) -> None:
    """The width attributes of a one-stage model whose residual is now ``width`` wide: ``embed_dim``,
    ``num_features``, ``feature_info``, an attention pool's head size and ``head_hidden_size`` (the pool's output
    width when there is one)."""
    model.embed_dim = model.num_features = width
    for info in getattr(model, "feature_info", []):
        info["num_chs"] = width
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        sync_attn_pool(pool)
    model.head_hidden_size = pool.out_features if pool is not None else width


def linear_q_rows(model: nn.Module, path: str, start: int = 0, count: int | None = None) -> QRows:
    """Rows ``[start, start + count)`` (every row from ``start`` by default) of the weight and bias of the Linear at
    ``path``: a q projection of its own, or q's rows of a fused one."""
    lin = model.get_submodule(path)
    rows = slice(start, lin.weight.shape[0] if count is None else start + count)
    return [(t, rows) for t in (lin.weight, lin.bias) if t is not None]


def fused_q_rows(model: nn.Module, attn: str) -> QRows:
    """What makes q in an attention at ``attn`` with a fused q|k|v Linear ``qkv``: its first third of rows, and the
    separate ``q_bias`` added to it (EVA, BEiT, Swin V2)."""
    a = model.get_submodule(f"{attn}.qkv").weight.shape[0] // 3
    q_bias = getattr(model.get_submodule(attn), "q_bias", None)
    return linear_q_rows(model, f"{attn}.qkv", 0, a) + ([(q_bias, slice(0, a))] if q_bias is not None else [])


def sync_generic_attributes(model: nn.Module) -> None:
    """Make stock torch layers' size attributes agree with their (possibly sliced) tensors."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif (isinstance(m, nn.LayerNorm) or is_rms_norm(m)) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.Conv2d):
            if m.groups > 1 and m.groups == m.in_channels == m.out_channels:  # depthwise: one group per channel
                m.groups = m.weight.shape[0]
            m.out_channels = m.weight.shape[0]
            m.in_channels = m.weight.shape[1] * m.groups
        elif isinstance(m, nn.BatchNorm2d):
            m.num_features = m.weight.shape[0]
        elif isinstance(m, nn.Embedding):  # CLIP's position table
            m.num_embeddings, m.embedding_dim = m.weight.shape


def _mlp_form(model: nn.Module, path: str) -> str:
    """``"mlp"`` (timm Mlp), ``"glu"`` (GluMlp / SwiGLUPacked: fc1 rows = [value | gate]) or ``"swiglu"`` (SwiGLU:
    separate fc1_g / fc1_x); anything else is an error naming it."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    m = model.get_submodule(path)
    if type(m) is Mlp:
        form, fc1s = "mlp", ("fc1", "fc2")
    elif isinstance(m, GluMlp):
        form, fc1s = "glu", ("fc1", "fc2")
    elif type(m) is SwiGLU:
        form, fc1s = "swiglu", ("fc1_g", "fc1_x", "fc2")
    else:
        raise UnsupportedModelError(f"{path}: {type(m).__module__}.{type(m).__name__} is not supported (timm Mlp, "
                                    "GluMlp / SwiGLUPacked and SwiGLU are)")
    for name in fc1s:
        if not isinstance(getattr(m, name), nn.Linear):  # use_conv=True MLPs have 1x1 convs
            raise UnsupportedModelError(f"{path}.{name}: {type(getattr(m, name)).__name__} is not an nn.Linear")
    return form


def mlp_input_slices(model: nn.Module, path: str) -> list[TensorSlice]:
    """Input columns of the MLP at ``path``: what a residual channel removes from it."""
    if _mlp_form(model, path) == "swiglu":
        return linear_slices(model, f"{path}.fc1_g", "in") + linear_slices(model, f"{path}.fc1_x", "in")
    return linear_slices(model, f"{path}.fc1", "in")


def mlp_slices(model: nn.Module, path: str) -> list[TensorSlice]:
    """Every slice one hidden unit ``j`` of the MLP at ``path`` implies (its input to ``fc2`` is the unit).

    Mlp: fc1 row j, fc2 column j. GluMlp: fc1 rows j and H + j (value and gate halves), fc2 column j. SwiGLU:
    fc1_g row j, fc1_x row j, fc2 column j. A sub-norm over the hidden width (``norm``) is sliced with them.
    """
    form = _mlp_form(model, path)
    m = model.get_submodule(path)
    hidden = m.fc2.in_features
    if form == "swiglu":
        rows = linear_slices(model, f"{path}.fc1_g", "out") + linear_slices(model, f"{path}.fc1_x", "out")
    elif form == "glu":
        rows = linear_slices(model, f"{path}.fc1", "out", repeats=2, stride=hidden)
    else:
        rows = linear_slices(model, f"{path}.fc1", "out")
    return rows + norm_slices(model, f"{path}.norm") + linear_slices(model, f"{path}.fc2", "in")


def check_attn_pool(pool: nn.Module) -> None:
    """An attention pool whose widths follow the residual and its own MLP (timm ``AttentionPoolLatent``)."""
    from timm.layers import AttentionPoolLatent

    if type(pool) is not AttentionPoolLatent:
        raise UnsupportedModelError(f"attn_pool: {type(pool).__name__} is not supported (only AttentionPoolLatent)")
    if not isinstance(pool.q, nn.Linear):
        raise UnsupportedModelError("attn_pool: q_proj=False (the latent is the query) is not supported: its width "
                                    "would have to follow the residual's pruned width")
    if not (isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity)):
        raise UnsupportedModelError("attn_pool: q/k norms in the attention pool are not supported")
    if pool.mlp is None:
        raise UnsupportedModelError("attn_pool: out_features=0 (the pooled attention output feeds the head) is not "
                                    "supported: the head's input would be the pool's tied attention width")


def attn_pool_groups(model: nn.Module, path: str, groups: dict[str, Group]) -> list[TensorSlice]:
    """Add an attention pool's groups to ``groups``; return the residual's slices in it.

    timm's ``AttentionPoolLatent`` reshapes its attention output to its input width, so its attention
    (``{path}.attn``) is tied to the residual's kept count; its MLP is a group; its output width (proj -> MLP ->
    fc_norm -> head, one pooled token) is left whole.
    """
    pool = model.get_submodule(path)
    res = linear_slices(model, f"{path}.kv", "in")
    if pool.pos_embed is not None:
        res.append(TensorSlice(f"{path}.pos_embed", 1))
    a = pool.kv.out_features // 2
    groups[f"{path}.attn"] = Group(
        f"{path}.attn", "attn", a,
        linear_slices(model, f"{path}.q", "out") + linear_slices(model, f"{path}.kv", "out", 2, a)
        + linear_slices(model, f"{path}.proj", "in"),
        num_heads=pool.num_heads, head_dim=pool.head_dim, module=path, tied_to="residual")
    groups[f"{path}.mlp"] = Group(f"{path}.mlp", "mlp", pool.mlp.fc2.in_features, mlp_slices(model, f"{path}.mlp"),
                                  module=f"{path}.mlp")
    return res


def sync_attn_pool(pool: nn.Module) -> None:
    """An attention pool's head size and scale from its (sliced) kv projection."""
    pool.head_dim = pool.kv.out_features // 2 // pool.num_heads
    pool.scale = pool.head_dim ** -0.5


def merged_grids(size: tuple[int, int], patch: tuple[int, int], stages: int) -> list[tuple[int, int]]:
    """Each stage's token grid of a Swin-style model: ``size`` over the patch stride (padded up), halved (rounding
    up: the merging pads an odd side) by the merging in front of every later stage."""
    h, w = -(-size[0] // patch[0]), -(-size[1] // patch[1])
    out = []
    for _ in range(stages):
        out.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return out


def import_class(dotted: str) -> type:
    """The class at a dotted path (``"timm.models.beit.Beit"``), importing its module (timm loads lazily here)."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


class TimmModelClass:
    """``matches`` for an adapter of one timm model class and its subclasses, named by ``model_class``
    (``"timm.models.beit.Beit"``, see :func:`import_class`). Mixed in before
    :class:`~vitprune_fast.arch.base.Adapter`."""

    model_class: ClassVar[str]

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` is an instance of ``model_class`` (a type check, no validation)."""
        return isinstance(model, import_class(cls.model_class))


class PatchEmbedNormHead:
    """Adapter methods for a model whose ``patch_embed`` has a Conv2d ``proj`` and an ``img_size`` and whose head is
    its final ``norm`` then ``forward_head`` (ViT, Swin V1 / V2, the one-stage families). Mixed in before
    :class:`~vitprune_fast.arch.base.Adapter`."""

    def head(self, x):
        m = self.model
        return m.forward_head(m.norm(x))

    def embed_modules(self) -> list[nn.Module]:
        return [self.model.patch_embed]

    def input_size(self) -> tuple[int, int, int]:
        pe = self.model.patch_embed
        h, w = pe.img_size
        return pe.proj.in_channels, h, w


class NormTokens:
    """Final tokens of a timm model whose ``forward_features`` is its blocks then ``norm`` (ViT, Swin V1). Mixed in
    before :class:`~vitprune_fast.arch.base.Adapter`."""

    def final_tokens(self, x):
        return self.model.norm(x)

    def model_tokens(self, images):
        return self.model.forward_features(images)


class SingleStageDefaults(TimmModelClass, PatchEmbedNormHead):
    """Adapter methods shared by the one-stage families (BEiT, CaiT, EVA, rel-pos ViT): :class:`TimmModelClass`,
    :class:`PatchEmbedNormHead`, an optional Linear ``head``, pre-norm blocks in ``model.blocks`` (and the other
    lists in ``block_lists``) and a fused-qkv attention tied to the residual unless a family says otherwise. Mixed in
    before :class:`~vitprune_fast.arch.base.Adapter`.

    Attributes:
        block_lists: the model's block lists, in forward order.
        tokens: the model's ``[1, N, C]`` token / position tensors, in the order the residual lists them.
        layer_scales: the layer-scale parameters of a block (relative to it), where it has them.
    """

    block_lists: ClassVar[tuple[str, ...]] = ("blocks",)
    tokens: ClassVar[tuple[str, ...]] = ("cls_token", "pos_embed")
    layer_scales: ClassVar[tuple[str, ...]] = ("gamma_1", "gamma_2")

    def _block_paths(self) -> Iterator[tuple[str, nn.Module]]:
        """``(path, block)`` of every block, list by list."""
        for attr in self.block_lists:
            for i, blk in enumerate(getattr(self.model, attr)):
                yield f"{attr}.{i}", blk

    def _check(self) -> None:
        """The patch embedding, the head, an attention pool, then every block (:meth:`_check_block`)."""
        m = self.model
        check_conv_embed_and_head(m)
        if getattr(m, "attn_pool", None) is not None:
            check_attn_pool(m.attn_pool)
        for where, blk in self._block_paths():
            self._check_block(where, blk)

    def _check_block(self, where: str, blk: nn.Module) -> None:
        """A clear ``UnsupportedModelError`` naming what the block at ``where`` has that cannot be pruned."""
        raise NotImplementedError

    def _attn_inputs(self, p: str, blk: nn.Module) -> tuple[str, ...]:
        """The Linears (relative to block ``p``) whose input columns the residual reaches in the attention."""
        return ("attn.qkv",)

    def _attn_group(self, p: str, blk: nn.Module) -> Group:
        """The attention group of block ``p``: fused qkv rows (with separate q / v biases), tied to the residual."""
        at = f"{p}.attn"
        return attn_group(self.model, at, blk.attn.qkv.out_features // 3, fused_qkv_rows(self.model, at),
                          tied_to="residual")

    def _residual_group(self, res: list[TensorSlice]) -> Group:
        """The residual group with slices ``res``."""
        return Group("residual", "residual", self.model.embed_dim, res)

    def describe(self) -> PruningSpace:
        """``residual``, ``{blocks}.{i}.attn`` (see :meth:`_attn_group`) and ``{blocks}.{i}.mlp``."""
        self._check()
        m = self.model
        res = patch_embed_slices(m) + token_slices(m, self.tokens)
        if hasattr(m, "norm_pre"):
            res += norm_slices(m, "norm_pre")
        groups: dict[str, Group] = {}
        for p, blk in self._block_paths():
            res += prenorm_residual_slices(m, p, self.layer_scales, self._attn_inputs(p, blk))
            groups[f"{p}.attn"] = self._attn_group(p, blk)
            groups[f"{p}.mlp"] = mlp_group(m, f"{p}.mlp")
        res += residual_tail(m, groups)
        return PruningSpace(self.arch, {"residual": self._residual_group(res)} | groups)

    def q_rows(self, group: Group) -> QRows:
        """The fused qkv's first third of rows (and a separate ``q_bias``)."""
        return fused_q_rows(self.model, group.module)

    def sync_attributes(self) -> None:
        """Generic layer sizes, the residual width (:func:`sync_single_stage_width`), then every attention's."""
        m = self.model
        sync_generic_attributes(m)
        sync_single_stage_width(m, m.patch_embed.proj.weight.shape[0])
        for _, blk in self._block_paths():
            self._sync_attn(blk.attn)

    def _sync_attn(self, attn: nn.Module) -> None:
        """An attention's scale (and ``head_dim``, where the module keeps one) from its output projection's width."""
        head_dim = attn.proj.in_features // attn.num_heads
        if hasattr(attn, "head_dim"):
            attn.head_dim = head_dim
        attn.scale = head_dim ** -0.5

    def classifier_weights(self) -> list:
        return [self.model.head.weight] if isinstance(self.model.head, nn.Linear) else []

    def build_recipe(self) -> dict:
        """Input, classes, depth, width and head count; the registered name's defaults give the rest (the module
        layout is checked against the model at save time)."""
        m = self.model
        pe = m.patch_embed
        return dict(img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
                    num_classes=m.num_classes, global_pool=m.global_pool, depth=len(m.blocks),
                    embed_dim=pe.proj.weight.shape[0], num_heads=m.blocks[0].attn.num_heads if len(m.blocks) else 1)

    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        if stage != 0:
            raise IndexError(f"a {type(self.model).__name__} has one stage of blocks, got stage {stage}")
        old = self.model.blocks
        self.model.blocks = nn.Sequential(*blocks) if isinstance(old, nn.Sequential) else nn.ModuleList(blocks)
