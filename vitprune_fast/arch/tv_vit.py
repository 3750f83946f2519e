"""torchvision ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32``, ``vit_h_14``;
torchvision is imported only when such a model is passed).

An ``EncoderBlock`` is ``ln_1 -> self_attention (nn.MultiheadAttention) -> + input``, ``ln_2 -> mlp (Linear 0, GELU,
Linear 3) -> + x``. ``nn.MultiheadAttention`` packs q / k / v in one ``in_proj_weight`` ``[3E, E]`` and computes
its width from its input (``embed_dim`` = the residual width), so each attention is tied to the residual's kept
count (``Group.tied_to``) and keeps every head, the same number of dims in each: ``head_dim`` follows, and its scale
``1/sqrt(head_dim)`` is computed inside ``F.multi_head_attention_forward`` from it (a head merge, which must keep the
original per-dim scale, is refused). Both the fused inference path (``torch._native_multi_head_attention``) and the
explicit one read ``embed_dim`` / ``num_heads`` / ``head_dim``, which follow the tensors. Groups are named by module
path: ``encoder.layers.encoder_layer_3.self_attention``, ``encoder.layers.encoder_layer_3.mlp`` and ``residual``.

The UP-ViTs engines score the attention by rerunning the block per candidate with q / k / v rows zeroed where
``F.linear`` applies ``in_proj_weight`` (``BlockRef.qkv_functional``). ``F.multi_head_attention_forward`` makes that
call inside its own torch-function dispatch, where no tap sees it, so while they score each attention runs
:func:`explicit_attention` instead (:meth:`TvViTAdapter.scoring_context`): the same eval-mode computation, written
out; the reference engine runs torchvision's own, and the tests compare the two.
"""
from __future__ import annotations

import types
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UnsupportedModelError
from ..overrides import replaced_forward
from ..space import Group, PruningSpace, TensorSlice
from .base import Adapter, BlockRef, StageRef
from .common import QRows, conv_out_slices, linear_slices, norm_slices, sync_generic_attributes

_CLASS = "torchvision.models.vision_transformer.VisionTransformer"


class TvViTAdapter(Adapter):
    """torchvision ``VisionTransformer``: one stage, ``residual``, a tied ``self_attention`` and an ``mlp`` group per
    encoder layer."""

    arch = "tv_vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        t = type(model)
        return f"{t.__module__}.{t.__name__}" == _CLASS

    # ------------------------------------------------------------------------------------------ helpers
    def _layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"encoder.layers.{n}", blk) for n, blk in self.model.encoder.layers.named_children()]

    def _check(self) -> None:
        from torchvision.models.vision_transformer import EncoderBlock, MLPBlock

        m = self.model
        if not isinstance(m.conv_proj, nn.Conv2d):
            raise UnsupportedModelError("conv_proj: a convolutional stem (conv_stem_configs) is not supported")
        for p, blk in self._layers():
            if type(blk) is not EncoderBlock or type(blk.mlp) is not MLPBlock:
                raise UnsupportedModelError(f"{p}: {type(blk).__name__} is not torchvision's EncoderBlock")
            att = blk.self_attention
            if not att._qkv_same_embed_dim or att.in_proj_bias is None or att.bias_k is not None:
                raise UnsupportedModelError(f"{p}.self_attention: only a packed in_proj with biases is supported")
            if not att.batch_first:
                raise UnsupportedModelError(f"{p}.self_attention: batch_first=False is not supported")
        for name, mod in m.heads.named_children():
            if name not in ("pre_logits", "act", "head"):
                raise UnsupportedModelError(f"heads.{name}: {type(mod).__name__} is not supported")

    # ------------------------------------------------------------------------------------------ structure
    def describe(self) -> PruningSpace:
        """``residual``, ``{layer}.self_attention`` (tied to it) and ``{layer}.mlp`` of every encoder layer."""
        self._check()
        m = self.model
        res = conv_out_slices(m, "conv_proj") + [TensorSlice("class_token", 2), TensorSlice("encoder.pos_embedding", 2)]
        groups: dict[str, Group] = {}
        for p, blk in self._layers():
            at, e = f"{p}.self_attention", blk.self_attention.embed_dim
            res += norm_slices(m, f"{p}.ln_1") + norm_slices(m, f"{p}.ln_2")
            res += [TensorSlice(f"{at}.in_proj_weight", 1)] + linear_slices(m, f"{at}.out_proj", "out")
            res += linear_slices(m, f"{p}.mlp.0", "in") + linear_slices(m, f"{p}.mlp.3", "out")
            rows = [TensorSlice(f"{at}.in_proj_weight", 0, 3, e), TensorSlice(f"{at}.in_proj_bias", 0, 3, e)]
            heads = blk.self_attention.num_heads
            groups[at] = Group(at, "attn", e, rows + linear_slices(m, f"{at}.out_proj", "in"), num_heads=heads,
                               head_dim=e // heads, module=at, tied_to="residual")
            groups[f"{p}.mlp"] = Group(f"{p}.mlp", "mlp", blk.mlp[0].out_features,
                                       linear_slices(m, f"{p}.mlp.0", "out") + linear_slices(m, f"{p}.mlp.3", "in"),
                                       module=f"{p}.mlp")
        res += norm_slices(m, "encoder.ln")
        first = "heads.pre_logits" if hasattr(m.heads, "pre_logits") else "heads.head"
        if hasattr(m.heads, first.split(".")[1]):
            res += linear_slices(m, first, "in")
        return PruningSpace(self.arch, {"residual": Group("residual", "residual", m.hidden_dim, res, module="")}
                            | groups)

    def stages(self) -> list[StageRef]:
        refs = []
        for i, (p, _) in enumerate(self._layers()):
            at = f"{p}.self_attention"
            refs.append(BlockRef(i, 0, p, at, f"{p}.mlp", f"{p}.ln_1", f"{p}.ln_2", at, f"{at}.out_proj",
                                 f"{p}.mlp.0", f"{p}.mlp.1", f"{p}.mlp.3", qkv_functional=True,
                                 branch_outputs=(f"{p}.dropout", f"{p}.mlp")))  # the attention returns a tuple
        m = self.model
        grid = (m.image_size // m.patch_size,) * 2
        return [StageRef(0, tuple(refs), "residual", None, m.conv_proj.out_channels, grid, 1, True)]

    def scoring_context(self):
        """Every attention runs :func:`explicit_attention` (module docstring)."""
        return replaced_forward([(blk.self_attention, explicit_attention(blk.self_attention))
                                 for _, blk in self._layers()])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m._process_input(images.to(m.conv_proj.weight.dtype))
        x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return m.encoder.dropout(x + m.encoder.pos_embedding)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.heads(m.encoder.ln(x)[:, 0])

    def embed_modules(self) -> list[nn.Module]:
        return [self.model.conv_proj]

    def final_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output (after ``encoder.ln``)."""
        return self.model.encoder.ln(x)

    def model_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """torchvision's forward up to the encoder's output (its own ``_process_input`` and ``encoder``)."""
        m = self.model
        x = m._process_input(images)
        return m.encoder(torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1))

    def input_size(self) -> tuple[int, int, int]:
        return 3, self.model.image_size, self.model.image_size

    def classifier_weights(self) -> list[torch.Tensor]:
        head = getattr(self.model.heads, "head", None)
        return [head.weight] if isinstance(head, nn.Linear) else []

    def num_classes(self) -> int:
        return self.model.num_classes if self.classifier_weights() else 0

    def q_rows(self, group: Group) -> QRows:
        att = self.model.get_submodule(group.module)
        rows = slice(0, att.embed_dim)
        return [(att.in_proj_weight, rows), (att.in_proj_bias, rows)]

    # ---------------------------------------------------------------------------------------- mutation
    def regroup_heads_masked(self, group: Group, heads: int) -> None:
        raise UnsupportedModelError(f"{group.name}: nn.MultiheadAttention computes its scale from its head size, so a "
                                    "head merge (which keeps the original per-dim scale) cannot be expressed")

    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        if stage != 0:
            raise IndexError(f"a ViT has one stage, got stage {stage}")
        kept = {id(b) for b in blocks}  # the blocks keep their names (encoder_layer_i), as torchvision's state dicts
        layers = self.model.encoder.layers.named_children()
        self.model.encoder.layers = nn.Sequential(OrderedDict((n, b) for n, b in layers if id(b) in kept))

    def sync_attributes(self) -> None:
        """Linear / LayerNorm sizes, the model's ``hidden_dim`` / ``mlp_dim``, and every attention's ``embed_dim``,
        ``kdim``, ``vdim``, ``head_dim`` (and the block's ``num_heads``) from the tensors."""
        m = self.model
        sync_generic_attributes(m)
        m.hidden_dim = m.conv_proj.out_channels
        widths = {blk.mlp[0].out_features for _, blk in self._layers()}
        if len(widths) == 1:
            m.mlp_dim = widths.pop()
        for _, blk in self._layers():
            att = blk.self_attention
            e = att.in_proj_weight.shape[1]
            att.embed_dim = att.kdim = att.vdim = e
            att.head_dim = e // att.num_heads
            blk.num_heads = att.num_heads

    # ------------------------------------------------------------------------------------- persistence
    def model_name(self) -> str:
        return "torchvision.VisionTransformer"

    @classmethod
    def build_model(cls, model_name: str, kwargs: dict) -> nn.Module:
        """``torchvision.models.VisionTransformer(**kwargs)`` (the unpruned widths; tensors are resized after)."""
        from torchvision.models import VisionTransformer

        if model_name != "torchvision.VisionTransformer":
            raise UnsupportedModelError(f"{model_name} is not a class {cls.__name__} builds")
        return VisionTransformer(**kwargs)

    def build_recipe(self) -> dict:
        m, layers = self.model, self._layers()
        return {"image_size": m.image_size, "patch_size": m.patch_size, "num_layers": len(layers),
                "num_heads": layers[0][1].self_attention.num_heads if layers else 1, "hidden_dim": m.hidden_dim,
                "mlp_dim": m.mlp_dim, "num_classes": m.num_classes, "representation_size": m.representation_size}


def explicit_attention(att: nn.MultiheadAttention):
    """A forward for batch-first ``att`` in eval mode, written out: ``F.linear`` with ``in_proj_weight`` (on the
    query, and on the keys when they are another tensor: transformers' SigLIP pools with a probe query),
    ``softmax(q k^T / sqrt(head_dim)) v``, then a call of ``out_proj`` (what ``nn.MultiheadAttention`` computes; no
    attention mask, no dropout, keys and values one tensor).

    Returned bound to ``att``: a deep copy of the module made while it is in place (the reference engine's
    candidates) is bound to the copy, not to ``att``."""
    return types.MethodType(_explicit_forward, att)


def _explicit_forward(att: nn.MultiheadAttention, query, key, value, *args, **kwargs):
    if (key is not value or args or kwargs.get("attn_mask") is not None or att.training
            or not att.batch_first):
        raise UnsupportedModelError("explicit_attention computes eval-mode batch-first attention without a mask, "
                                    "its keys and values one tensor")
    b, n, _ = query.shape
    m, h, a = key.shape[1], att.num_heads, att.in_proj_weight.shape[0] // 3
    qkv = F.linear(query, att.in_proj_weight, att.in_proj_bias)  # [B, N, 3A]
    kv = qkv if key is query else F.linear(key, att.in_proj_weight, att.in_proj_bias)  # [B, M, 3A]
    q = qkv[..., :a].reshape(b, n, h, a // h).transpose(1, 2)  # [B, H, N, hd]
    k, v = (kv[..., i * a:(i + 1) * a].reshape(b, m, h, a // h).transpose(1, 2) for i in (1, 2))  # [B, H, M, hd]
    weights = torch.softmax((q @ k.transpose(-2, -1)) * (a // h) ** -0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, a)
    return att.out_proj(out), None  # a module call: its input hooks fire (the engines, reconstruction)
