"""Hugging Face ``transformers`` ViT: ``ViTModel`` and ``ViTForImageClassification`` (``transformers`` is an optional
extra, imported only when such a model is passed).

A ``ViTLayer`` is a pre-norm block with other names: ``layernorm_before -> attention (query / key / value Linears ->
heads -> output.dense)``, ``layernorm_after -> intermediate.dense -> act -> output.dense``, where ``ViTOutput`` adds
the residual itself, so the MLP branch's contribution is ``output.dense``'s output. Groups are named by the
library's module paths: ``vit.encoder.layer.3.attention``, ``vit.encoder.layer.3.intermediate`` and ``residual``.

Outputs: a classifier's ``logits``; a ``ViTModel``'s ``pooler_output`` when it has a pooler, else the class token of
its final ``layernorm`` (what ``ViTForImageClassification`` classifies) -- the features objective scores those.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..space import Group, PruningSpace, TensorSlice
from .base import Adapter, BlockRef, StageRef
from .common import QRows, linear_q_rows, linear_slices, norm_slices, separate_qkv_rows, sync_generic_attributes

_PROJS = ("query", "key", "value")


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` class (checked by module name: nothing is imported)."""
    return type(model).__module__.startswith("transformers.")


class HfViTAdapter(Adapter):
    """``transformers`` ``ViTModel`` / ``ViTForImageClassification`` (eager and SDPA attention)."""

    arch = "hf_vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not is_transformers_model(model):
            return False
        from transformers import ViTForImageClassification, ViTModel

        return type(model) in (ViTModel, ViTForImageClassification)

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def _base(self) -> str:
        """Path prefix of the ``ViTModel`` inside the model (``"vit."`` in a classifier)."""
        return "vit." if hasattr(self.model, "vit") else ""

    @property
    def _vit(self) -> nn.Module:
        return getattr(self.model, "vit", self.model)

    def _layers(self) -> list[nn.Module]:
        return list(self._vit.encoder.layer)

    def _check(self) -> None:
        from transformers.models.vit.modeling_vit import ViTLayer

        vit = self._vit
        if not isinstance(vit.embeddings.patch_embeddings.projection, nn.Conv2d):
            raise UnsupportedModelError("embeddings.patch_embeddings.projection must be a Conv2d")
        for i, layer in enumerate(self._layers()):
            if type(layer) is not ViTLayer:
                raise UnsupportedModelError(f"{self._base}encoder.layer.{i}: {type(layer).__name__} is not a ViTLayer")
        clf = getattr(self.model, "classifier", None)
        if clf is not None and not isinstance(clf, (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(f"classifier: {type(clf).__name__} is not supported")

    # ------------------------------------------------------------------------------------------ structure
    def describe(self) -> PruningSpace:
        """``residual``, ``{layer}.attention`` (query / key / value rows, ``output.dense`` columns) and
        ``{layer}.intermediate`` (``intermediate.dense`` rows, ``output.dense`` columns) of every layer."""
        self._check()
        m, b = self.model, self._base
        emb = f"{b}embeddings"
        res = [TensorSlice(f"{emb}.patch_embeddings.projection.weight", 0)]
        if self._vit.embeddings.patch_embeddings.projection.bias is not None:
            res.append(TensorSlice(f"{emb}.patch_embeddings.projection.bias", 0))
        res += [TensorSlice(f"{emb}.{t}", 2) for t in ("cls_token", "mask_token", "position_embeddings")
                if getattr(self._vit.embeddings, t, None) is not None]
        groups: dict[str, Group] = {}
        for i, layer in enumerate(self._layers()):
            p = f"{b}encoder.layer.{i}"
            sa = f"{p}.attention.attention"
            res += norm_slices(m, f"{p}.layernorm_before") + norm_slices(m, f"{p}.layernorm_after")
            res += [s for n in _PROJS for s in linear_slices(m, f"{sa}.{n}", "in")]
            res += linear_slices(m, f"{p}.attention.output.dense", "out")
            res += linear_slices(m, f"{p}.intermediate.dense", "in") + linear_slices(m, f"{p}.output.dense", "out")
            att = layer.attention.attention
            width = att.query.out_features
            groups[f"{p}.attention"] = Group(
                f"{p}.attention", "attn", width,
                separate_qkv_rows(m, sa, _PROJS) + linear_slices(m, f"{p}.attention.output.dense", "in"),
                num_heads=att.num_attention_heads, head_dim=width // att.num_attention_heads, module=sa)
            groups[f"{p}.intermediate"] = Group(
                f"{p}.intermediate", "mlp", layer.intermediate.dense.out_features,
                linear_slices(m, f"{p}.intermediate.dense", "out") + linear_slices(m, f"{p}.output.dense", "in"),
                module=f"{p}.intermediate")
        res += norm_slices(m, f"{b}layernorm")
        if getattr(self._vit, "pooler", None) is not None:  # its output width is its own: left whole
            res += linear_slices(m, f"{b}pooler.dense", "in")
        if isinstance(getattr(m, "classifier", None), nn.Linear):
            res += linear_slices(m, "classifier", "in")
        residual = Group("residual", "residual", self._vit.config.hidden_size, res, module="")
        return PruningSpace(self.arch, {"residual": residual} | groups)

    def stages(self) -> list[StageRef]:
        b = self._base
        refs = []
        for i in range(len(self._layers())):
            p = f"{b}encoder.layer.{i}"
            refs.append(BlockRef(i, 0, p, f"{p}.attention", f"{p}.intermediate", f"{p}.layernorm_before",
                                 f"{p}.layernorm_after", f"{p}.attention.attention.query",
                                 f"{p}.attention.output.dense", f"{p}.intermediate.dense",
                                 f"{p}.intermediate.intermediate_act_fn", f"{p}.output.dense",
                                 branch_outputs=(f"{p}.attention", f"{p}.output.dense")))
        emb = self._vit.embeddings
        _, h, w = self.input_size()
        ps = emb.patch_embeddings.patch_size
        grid = (h // ps[0], w // ps[1])
        return [StageRef(0, tuple(refs), "residual", None, emb.patch_embeddings.projection.out_channels, grid, 1,
                         True)]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self._vit.embeddings(images.to(self._vit.embeddings.patch_embeddings.projection.weight.dtype))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        vit, m = self._vit, self.model
        x = vit.layernorm(x)
        if m is not vit:
            return m.classifier(x[:, 0])
        return vit.pooler(x) if vit.pooler is not None else x[:, 0]

    def output(self, out) -> torch.Tensor:
        """The tensor the model's output object carries (module docstring)."""
        if hasattr(out, "logits"):
            return out.logits
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    def embed_modules(self) -> list[nn.Module]:
        return [self._vit.embeddings]

    def input_size(self) -> tuple[int, int, int]:
        cfg = self._vit.config
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
        return cfg.num_channels, int(size[0]), int(size[1])

    def accepts_size(self, h: int, w: int) -> bool:
        return (h, w) == tuple(self.input_size()[1:])

    def classifier_weights(self) -> list[torch.Tensor]:
        clf = getattr(self.model, "classifier", None)
        return [clf.weight] if isinstance(clf, nn.Linear) else []

    def num_classes(self) -> int:
        return self.model.config.num_labels if self.classifier_weights() else 0

    def output_group(self) -> str | None:
        """A pooler's output width is its own (left whole)."""
        if getattr(self._vit, "pooler", None) is not None and self.model is self._vit:
            return None
        return super().output_group()

    def q_rows(self, group: Group) -> QRows:
        return linear_q_rows(self.model, f"{group.module}.query")

    # ---------------------------------------------------------------------------------------- mutation
    def set_heads(self, group: Group, heads: int) -> None:
        self.model.get_submodule(group.module).num_attention_heads = heads

    def regroup_heads_masked(self, group: Group, heads: int) -> None:
        att = self.model.get_submodule(group.module)
        att.num_attention_heads = heads
        att.attention_head_size = group.size // heads
        att.scaling = group.head_dim ** -0.5  # the per-dim scale of the original heads (eager and SDPA read it)

    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        if stage != 0:
            raise IndexError(f"a ViT has one stage, got stage {stage}")
        self._vit.encoder.layer = nn.ModuleList(blocks)
        self._sync_config()

    def sync_attributes(self) -> None:
        """Linear / LayerNorm sizes, every attention's ``attention_head_size``, ``all_head_size`` and ``scaling``,
        and the config's sizes where the shape is uniform (:meth:`_sync_config`)."""
        sync_generic_attributes(self.model)
        for layer in self._layers():
            att = layer.attention.attention
            att.all_head_size = att.query.out_features
            att.attention_head_size = att.all_head_size // att.num_attention_heads
            att.scaling = att.attention_head_size ** -0.5
        self._sync_config()

    def _sync_config(self) -> None:
        """``hidden_size`` always (the residual is one width); ``num_hidden_layers``; ``intermediate_size`` and
        ``num_attention_heads`` where every layer has the same (else the config keeps the unpruned values, and
        :meth:`pretrained_refusal` says why ``from_pretrained`` cannot rebuild the model)."""
        cfg = self._vit.config
        cfg.hidden_size = self._vit.embeddings.patch_embeddings.projection.out_channels
        cfg.num_hidden_layers = len(self._layers())
        shapes = self._layer_shapes()
        if len(shapes) == 1:
            heads, _, hidden = next(iter(shapes))
            cfg.num_attention_heads, cfg.intermediate_size = heads, hidden

    def _layer_shapes(self) -> set[tuple[int, int, int]]:
        """(heads, attention width, MLP width) of every layer."""
        return {(ly.attention.attention.num_attention_heads, ly.attention.attention.query.out_features,
                 ly.intermediate.dense.out_features) for ly in self._layers()}

    # ------------------------------------------------------------------------------------- persistence
    def build_recipe(self) -> dict:
        """The model's config (``to_dict``): its class is rebuilt from it by :meth:`build_model`."""
        return {"config": self._vit.config.to_dict(), "attn_implementation": self._vit.config._attn_implementation,
                "add_pooling_layer": getattr(self._vit, "pooler", None) is not None}

    def model_name(self) -> str:
        return f"transformers.{type(self.model).__name__}"

    @classmethod
    def build_model(cls, model_name: str, kwargs: dict) -> nn.Module:
        """``transformers.<class>(ViTConfig(**config))`` (a ``ViTModel`` with or without its pooler)."""
        import transformers

        name = model_name.removeprefix("transformers.")
        if name not in ("ViTModel", "ViTForImageClassification"):
            raise UnsupportedModelError(f"{model_name} is not a class {cls.__name__} builds")
        cfg = {k: v for k, v in kwargs["config"].items() if k not in ("transformers_version", "model_type")}
        if cfg["hidden_size"] % cfg["num_attention_heads"]:  # ViTConfig's check; the saved head counts come after
            cfg["num_attention_heads"] = 1
        config = transformers.ViTConfig(**cfg, attn_implementation=kwargs.get("attn_implementation"))
        klass = getattr(transformers, name)
        return klass(config, add_pooling_layer=kwargs["add_pooling_layer"]) if name == "ViTModel" else klass(config)

    def save_native(self, directory) -> dict:
        """``save_pretrained(directory)`` where the config expresses the shape (:meth:`pretrained_refusal`)."""
        why = self.pretrained_refusal()
        if why is not None:
            return {"reason": why}
        self.model.save_pretrained(str(directory))
        return {"directory": Path(directory).name,
                "load": f"transformers.{type(self.model).__name__}.from_pretrained({str(directory)!r})"}

    def pretrained_refusal(self) -> str | None:
        """Why ``from_pretrained`` of the config cannot rebuild this model, or None: transformers' ViT ties the
        attention width to ``hidden_size`` (``head_dim = hidden_size / num_attention_heads``) and has one
        ``intermediate_size`` and head count for every layer."""
        shapes = self._layer_shapes()
        d = self._vit.config.hidden_size
        if len(shapes) > 1:
            return f"layers differ in (heads, attention width, MLP width) {sorted(shapes)}"
        if shapes and next(iter(shapes))[1] != d:
            return (f"attention width {next(iter(shapes))[1]} differs from hidden_size {d}: transformers' ViT ties "
                    "them (head_dim = hidden_size / num_attention_heads)")
        return None
