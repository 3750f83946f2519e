"""Helpers shared by the architecture adapters."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..norms import is_affine_norm, is_rms_norm
from ..space import Group, TensorSlice


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


def patch_embed_slices(model: nn.Module) -> list[TensorSlice]:
    """What a residual channel removes from a conv patch embedding: its output channel (and bias), its norm's."""
    out = [TensorSlice("patch_embed.proj.weight", 0)]
    if model.patch_embed.proj.bias is not None:
        out.append(TensorSlice("patch_embed.proj.bias", 0))
    return out + norm_slices(model, "patch_embed.norm")


def qkv_bias_slices(model: nn.Module, attn: str) -> list[TensorSlice]:
    """The separate q / k / v biases (k: a zero buffer) an attention at ``attn`` adds to its fused qkv (EVA, BEiT,
    Swin V2): one entry per attention dim each."""
    m = model.get_submodule(attn)
    return [TensorSlice(f"{attn}.{b}", 0) for b in ("q_bias", "k_bias", "v_bias") if getattr(m, b, None) is not None]


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


class SingleStageDefaults(PatchEmbedNormHead):
    """Adapter methods shared by the one-stage families (BEiT, CaiT, EVA, rel-pos ViT): :class:`PatchEmbedNormHead`,
    an optional Linear ``head`` and the blocks in ``model.blocks``. Mixed in before
    :class:`~vitprune_fast.arch.base.Adapter`."""

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
