"""What transformers' pre-norm ViT encoders share (ViT, DeiT, DINOv2, CLIP's vision tower): one layer list, a layer of
``norm -> attention -> [layer scale] -> + residual``, ``norm -> MLP -> [layer scale] -> + residual``, a final norm
(subclasses name it, the patch embedding and any norm in front of the first layer).

transformers has written these layers two ways, and both are read, per layer, from the modules present
(:func:`layer_parts`):

- up to 5.8: ``encoder.layer.{i}``, ``attention.attention.query / key / value`` (the head attributes
  ``attention_head_size`` / ``all_head_size`` live there) and ``attention.output.dense``; ViT's MLP is
  ``intermediate.dense -> act -> output.dense`` (``ViTOutput`` adds the residual itself);
- from 5.9: ``q_proj / k_proj / v_proj / o_proj`` directly in ``attention`` (head attribute ``head_dim``, which the
  config may carry), ViT's layers at ``layers.{i}`` and its MLP ``mlp.fc1 -> act -> mlp.fc2``.

CLIP's layers are the 5.9 kind under other names (``layer_norm1 / 2``, ``self_attn.q_proj / k_proj / v_proj /
out_proj`` with ``num_heads`` / ``head_dim`` / ``scale``). DINOv2's MLP is ``fc1 / fc2``, or SwiGLU: one packed
``weights_in`` (rows ``[x1 | x2]``, ``silu(x1) * x2``) up to 5.8, ``gate_proj / up_proj / down_proj`` from 5.9.
Groups are named by the library's module paths.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..space import Group, PruningSpace, TensorSlice
from .base import Adapter, BlockRef, StageRef
from .common import (
    QRows,
    conv_out_slices,
    linear_q_rows,
    linear_slices,
    norm_slices,
    separate_qkv_rows,
    sync_generic_attributes,
)


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` class (checked by module name: nothing is imported)."""
    return type(model).__module__.startswith("transformers.")


@dataclass(frozen=True)
class LayerParts:
    """Where one layer keeps its parts (paths relative to the layer).

    Attributes:
        norm1, norm2: the LayerNorms in front of the attention and the MLP.
        attn: the module holding the q / k / v Linears and the head attributes.
        projs: the q / k / v Linears' names in ``attn``.
        out: the attention's output Linear.
        mlp: the MLP group's module; fc1: the Linear whose rows make the hidden unit's value (SwiGLU: ``up_proj``, or
            the packed ``weights_in``); gates: other Linears whose rows a unit also owns (``gate_proj``); act: the
            activation module; fc2: the output Linear (its input is the unit).
        packed: ``fc1`` holds two rows per unit (``[x1 | x2]``: a packed SwiGLU).
        ls1, ls2: the layer-scale modules (``lambda1`` per channel) or None.
        head_size: the attention attribute holding the head size.
        num_heads: the attention attribute holding the head count (``num_attention_heads``, CLIP's ``num_heads``).
        scale: the attention attribute holding the softmax scale it passes on (``scaling``, CLIP's ``scale``), or
            None where it computes ``1/sqrt(head size)`` itself (5.0's Swin).
    """

    norm1: str
    norm2: str
    attn: str
    projs: tuple[str, str, str]
    out: str
    mlp: str
    fc1: str
    gates: tuple[str, ...]
    act: str
    fc2: str
    packed: bool
    ls1: str | None
    ls2: str | None
    head_size: str
    num_heads: str = "num_attention_heads"
    scale: str | None = "scaling"

    @property
    def attn_group(self) -> str:
        """The attention group's module: the layer's attention child (``attention``, CLIP's ``self_attn``)."""
        return self.attn.split(".")[0]

    @property
    def attn_output(self) -> str:
        """The module whose output is the attention branch's contribution (the attention returns a tuple)."""
        return self.ls1 or self.out

    @property
    def mlp_output(self) -> str:
        return self.ls2 or self.fc2


def layer_parts(layer: nn.Module) -> LayerParts:
    """Read a layer's :class:`LayerParts` from the modules it has (module docstring); an unknown shape is an error."""
    norms = next((n for n in (("layernorm_before", "layernorm_after"), ("layer_norm1", "layer_norm2"))
                  if hasattr(layer, n[0])), ("norm1", "norm2"))
    outer = "self_attn" if hasattr(layer, "self_attn") else "attention"  # CLIP / SigLIP: self_attn
    inner = next((n for n in ("attention", "self") if hasattr(layer.get_submodule(outer), n)), None)  # 5.0 Swin: self
    attn = f"{outer}.{inner}" if inner else outer
    att = layer.get_submodule(attn)
    projs = ("query", "key", "value") if hasattr(att, "query") else ("q_proj", "k_proj", "v_proj")
    out = next((f"{outer}.{o}" for o in ("output.dense", "o_proj", "out_proj") if _has_path(layer, f"{outer}.{o}")),
               f"{outer}.o_proj")
    gates: tuple[str, ...] = ()
    packed = False
    if hasattr(layer, "intermediate"):
        mlp, fc1, act, fc2 = "intermediate", "intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"
    elif hasattr(layer.mlp, "fc1"):
        act = "mlp.activation_fn" if hasattr(layer.mlp, "activation_fn") else "mlp.activation"
        mlp, fc1, fc2 = "mlp", "mlp.fc1", "mlp.fc2"
    elif hasattr(layer.mlp, "weights_in"):
        mlp, fc1, act, fc2, packed = "mlp", "mlp.weights_in", "mlp", "mlp.weights_out", True
    elif hasattr(layer.mlp, "up_proj"):
        mlp, fc1, gates, act, fc2 = "mlp", "mlp.up_proj", ("mlp.gate_proj",), "mlp.act_fn", "mlp.down_proj"
    else:
        raise UnsupportedModelError(f"{type(layer).__name__}: an MLP of {type(layer.mlp).__name__} is not supported")
    for path in (*(f"{attn}.{p}" for p in projs), out, fc1, *gates, fc2):
        if not isinstance(layer.get_submodule(path), nn.Linear):
            raise UnsupportedModelError(f"{type(layer).__name__}.{path} is not an nn.Linear")
    ls = tuple(n if hasattr(layer, n) else None for n in ("layer_scale1", "layer_scale2"))
    head_size = "attention_head_size" if hasattr(att, "attention_head_size") else "head_dim"
    num_heads = "num_attention_heads" if hasattr(att, "num_attention_heads") else "num_heads"
    scale = next((n for n in ("scaling", "scale") if hasattr(att, n)), None)
    return LayerParts(*norms, attn, projs, out, mlp, fc1, gates, act, fc2, packed, *ls, head_size, num_heads, scale)


def _has_path(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class HfEncoderAdapter(Adapter):
    """The shared part of transformers pre-norm ViT encoders: subclasses name the classes, the inner model's
    attribute, the head, the config and what ``from_pretrained`` can express."""

    #: transformers class names this adapter takes
    classes: tuple[str, ...] = ()
    #: the attribute holding the encoder model inside a task model (``vit``, ``dinov2``)
    base_attr: str = ""
    #: transformers class names of the family's layers
    layer_classes: tuple[str, ...] = ()
    #: the model's Linear (or Identity) heads on the final layernorm
    heads: tuple[str, ...] = ("classifier",)
    #: paths in the encoder model: the patch embedding's Conv2d, norms between the embeddings and the first layer,
    #: the final norm
    patch_path: str = "embeddings.patch_embeddings.projection"
    pre_norms: tuple[str, ...] = ()
    final_norm: str = "layernorm"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_transformers_model(model) and type(model).__name__ in cls.classes

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def _base(self) -> str:
        """Path prefix of the encoder model inside the model (``"vit."`` in a classifier)."""
        return f"{self.base_attr}." if hasattr(self.model, self.base_attr) else ""

    @property
    def _enc(self) -> nn.Module:
        return getattr(self.model, self.base_attr, self.model)

    @property
    def _patch(self) -> nn.Conv2d:
        return self._enc.get_submodule(self.patch_path)

    @property
    def _layers_path(self) -> str:
        if hasattr(self._enc, "layers"):
            return "layers"
        return "encoder.layers" if hasattr(self._enc.encoder, "layers") else "encoder.layer"

    def _named_layers(self) -> list[tuple[str, nn.Module]]:
        """Every layer in forward order, with its path in the model."""
        return [(f"{self._base}{self._layers_path}.{i}", ly)
                for i, ly in enumerate(self._enc.get_submodule(self._layers_path))]

    def _layers(self) -> list[nn.Module]:
        return [ly for _, ly in self._named_layers()]

    def _layers_with_parts(self) -> list[tuple[nn.Module, LayerParts]]:
        return [(ly, layer_parts(ly)) for ly in self._layers()]

    def _layer_parts(self, i: int) -> LayerParts:
        return layer_parts(self._layers()[i])

    def _group_parts(self, group: Group) -> LayerParts:
        """The parts of the layer a layer's attention or MLP group (``{layer}.{child}``) belongs to."""
        return layer_parts(self.model.get_submodule(group.name.rpartition(".")[0]))

    def _check(self) -> None:
        """A Conv2d patch embedding, the family's own layer classes, Linear or Identity heads."""
        if not isinstance(self._patch, nn.Conv2d):
            raise UnsupportedModelError(f"{self.patch_path} must be a Conv2d")
        for path, layer in self._named_layers():
            if not is_transformers_model(layer) or type(layer).__name__ not in self.layer_classes:
                raise UnsupportedModelError(f"{path}: {type(layer).__name__} is not a "
                                            f"{' / '.join(self.layer_classes)}")
        for name in self.heads:
            clf = getattr(self.model, name, None)
            if clf is not None and not isinstance(clf, (nn.Linear, nn.Identity)):
                raise UnsupportedModelError(f"{name}: {type(clf).__name__} is not supported")

    # ------------------------------------------------------------------------------------------ structure
    def describe(self) -> PruningSpace:
        """``residual``, ``{layer}.attention`` (q / k / v rows, output Linear columns) and the MLP group (its input
        Linears' rows, output Linear's columns) of every layer."""
        self._check()
        m, b = self.model, self._base
        res = conv_out_slices(m, f"{b}{self.patch_path}")
        res += self._token_slices()
        res += [s for n in self.pre_norms for s in norm_slices(m, f"{b}{n}")]
        groups: dict[str, Group] = {}
        for p, layer in self._named_layers():
            res += self._layer_space(p, layer, "residual", groups)
        res += norm_slices(m, f"{b}{self.final_norm}") + self._head_slices()
        groups |= self._head_groups()
        residual = Group("residual", "residual", self._enc.config.hidden_size, res, module="")
        return PruningSpace(self.arch, {"residual": residual} | groups)

    def _layer_space(self, p: str, layer: nn.Module, residual: str, groups: dict[str, Group]) -> list[TensorSlice]:
        """Layer ``p``'s slices of residual group ``residual`` (returned), and its attention and MLP groups (added
        to ``groups``)."""
        m, lp = self.model, layer_parts(layer)
        sa = f"{p}.{lp.attn}"
        res = norm_slices(m, f"{p}.{lp.norm1}") + norm_slices(m, f"{p}.{lp.norm2}")
        res += [s for n in lp.projs for s in linear_slices(m, f"{sa}.{n}", "in")]
        res += linear_slices(m, f"{p}.{lp.out}", "out")
        res += [s for n in (lp.fc1, *lp.gates) for s in linear_slices(m, f"{p}.{n}", "in")]
        res += linear_slices(m, f"{p}.{lp.fc2}", "out")
        res += [TensorSlice(f"{p}.{ls}.lambda1", 0) for ls in (lp.ls1, lp.ls2) if ls is not None]
        att = layer.get_submodule(lp.attn)
        width = getattr(att, lp.projs[0]).out_features
        groups[f"{p}.{lp.attn_group}"] = Group(
            f"{p}.{lp.attn_group}", "attn", width,
            separate_qkv_rows(m, sa, lp.projs) + linear_slices(m, f"{p}.{lp.out}", "in") + self._head_tables(sa, att),
            num_heads=getattr(att, lp.num_heads), head_dim=width // getattr(att, lp.num_heads), module=sa,
            tied_to=residual if self._attention_tied(att) else None)
        hidden = layer.get_submodule(lp.fc2).in_features
        rows = (linear_slices(m, f"{p}.{lp.fc1}", "out", repeats=2, stride=hidden) if lp.packed
                else [s for n in (lp.fc1, *lp.gates) for s in linear_slices(m, f"{p}.{n}", "out")])
        groups[f"{p}.{lp.mlp}"] = Group(f"{p}.{lp.mlp}", "mlp", hidden,
                                        rows + linear_slices(m, f"{p}.{lp.fc2}", "in"), module=f"{p}.{lp.mlp}")
        return res

    def _head_tables(self, path: str, att: nn.Module) -> list[TensorSlice]:
        """Per-head tensors of attention ``att`` at ``path`` (Swin's relative-position bias table); none by
        default."""
        return []

    def _token_slices(self) -> list[TensorSlice]:
        """The residual's slices of the embeddings' tokens (:meth:`_token_names`, those the model has)."""
        emb = self._enc.embeddings
        return [TensorSlice(f"{self._base}embeddings.{t}", tensor.ndim - 1) for t in self._token_names()
                if (tensor := _tensor_at(emb, t)) is not None]

    def _token_names(self) -> tuple[str, ...]:
        """The embeddings' parameters (paths in it) with one entry per residual channel on their last dim."""
        return "cls_token", "mask_token", "register_tokens", "position_embeddings"

    def _attention_tied(self, att: nn.Module) -> bool:
        """Whether attention ``att`` reshapes its output to its input's width (then its group is tied to the
        residual's kept count); none of these families' does by default."""
        return False

    def _head_groups(self) -> dict[str, Group]:
        """Groups of the head's own (SigLIP's attention pool); none by default."""
        return {}

    def _head_slices(self) -> list[TensorSlice]:
        """The residual's slices after the final ``layernorm`` (a classifier's input columns)."""
        if isinstance(getattr(self.model, "classifier", None), nn.Linear):
            return linear_slices(self.model, "classifier", "in")
        return []

    @staticmethod
    def _block_ref(index: int, stage: int, p: str, layer: nn.Module) -> BlockRef:
        """Layer ``p`` as a :class:`BlockRef` (its branch outputs: the attention's output Linear, or its layer scale;
        the MLP's)."""
        lp = layer_parts(layer)
        ls = [f"{p}.{n}.lambda1" if n else None for n in (lp.ls1, lp.ls2)]
        outs = (f"{p}.{lp.attn_output}", f"{p}.{lp.mlp_output}")
        return BlockRef(index, stage, p, f"{p}.{lp.attn_group}", f"{p}.{lp.mlp}", f"{p}.{lp.norm1}", f"{p}.{lp.norm2}",
                        f"{p}.{lp.attn}.{lp.projs[0]}", f"{p}.{lp.out}", f"{p}.{lp.fc1}", f"{p}.{lp.act}",
                        f"{p}.{lp.fc2}", *ls, branch_outputs=outs)

    def stages(self) -> list[StageRef]:
        refs = [self._block_ref(i, 0, p, ly) for i, (p, ly) in enumerate(self._named_layers())]
        _, h, w = self.input_size()
        ps = self._patch.stride
        grid = (h // ps[0], w // ps[1])
        return [StageRef(0, tuple(refs), "residual", None, self._patch.out_channels, grid, self._prefix_tokens(),
                         True)]

    def _prefix_tokens(self) -> int:
        """Tokens in front of the patches: the class token and any register tokens."""
        regs = getattr(self._enc.embeddings, "register_tokens", None)
        return 1 + (regs.shape[1] if regs is not None else 0)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self._enc.embeddings(images.to(self._patch.weight.dtype))
        for n in self.pre_norms:
            x = self._enc.get_submodule(n)(x)
        return x

    def embed_modules(self) -> list[nn.Module]:
        return [self._enc.embeddings, *(self._enc.get_submodule(n) for n in self.pre_norms)]

    #: whether ``last_hidden_state`` is after the final norm (ViT, DINOv2; CLIP applies it to the pooled token only)
    tokens_normed: bool = True

    def final_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``last_hidden_state``: the last layer's output, after the final norm where the library applies it."""
        return self._enc.get_submodule(self.final_norm)(x) if self.tokens_normed else x

    def model_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self._enc(pixel_values=images).last_hidden_state

    def input_size(self) -> tuple[int, int, int]:
        cfg = self._enc.config
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
        return cfg.num_channels, int(size[0]), int(size[1])

    def accepts_size(self, h: int, w: int) -> bool:
        return (h, w) == tuple(self.input_size()[1:])

    def classifier_weights(self) -> list[torch.Tensor]:
        clf = getattr(self.model, "classifier", None)
        return [clf.weight] if isinstance(clf, nn.Linear) else []

    def num_classes(self) -> int:
        return self.model.config.num_labels if self.classifier_weights() else 0

    def q_rows(self, group: Group) -> QRows:
        return linear_q_rows(self.model, f"{group.module}.{self._group_parts(group).projs[0]}")

    # ---------------------------------------------------------------------------------------- mutation
    def set_heads(self, group: Group, heads: int) -> None:
        lp = self._group_parts(group)
        setattr(self.model.get_submodule(group.module), lp.num_heads, heads)

    def regroup_heads_masked(self, group: Group, heads: int) -> None:
        att = self.model.get_submodule(group.module)
        lp = self._group_parts(group)
        if lp.scale is None:
            raise UnsupportedModelError(f"{group.name}: {type(att).__name__} computes its scale from its head size, so "
                                        "a head merge (which keeps the original per-dim scale) cannot be expressed "
                                        "on a masked copy")
        setattr(att, lp.num_heads, heads)
        setattr(att, lp.head_size, group.size // heads)
        setattr(att, lp.scale, group.head_dim ** -0.5)  # the per-dim scale of the original heads (eager, SDPA)

    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        if stage != 0:
            raise IndexError(f"a ViT encoder has one stage, got stage {stage}")
        path, _, name = self._layers_path.rpartition(".")
        setattr(self._enc.get_submodule(path) if path else self._enc, name, nn.ModuleList(blocks))
        self._sync_config()

    def sync_attributes(self) -> None:
        """Linear / LayerNorm sizes, every attention's head size (``all_head_size`` too in the older layout) and
        ``scaling``, and the config's sizes where the shape is uniform (:meth:`_sync_config`)."""
        sync_generic_attributes(self.model)
        for layer, lp in self._layers_with_parts():
            att = layer.get_submodule(lp.attn)
            width, heads = getattr(att, lp.projs[0]).out_features, getattr(att, lp.num_heads)
            for name in ("all_head_size", "embed_dim"):  # the older layout's; CLIP's (its q / k / v width)
                if hasattr(att, name):
                    setattr(att, name, width)
            setattr(att, lp.head_size, width // heads)
            if lp.scale is not None:
                setattr(att, lp.scale, (width // heads) ** -0.5)
            if hasattr(layer, "embed_dim"):
                layer.embed_dim = self._patch.out_channels
        if hasattr(self._enc.embeddings, "embed_dim"):
            self._enc.embeddings.embed_dim = self._patch.out_channels
        self._sync_config()

    def _sync_config(self) -> None:
        """``hidden_size`` always (the residual is one width); ``num_hidden_layers``; where every layer has the same
        shape, the head count, ``head_dim`` where the config carries one (5.9 on) and the MLP width
        (:meth:`_set_mlp_width`); else the config keeps the unpruned values, and :meth:`pretrained_refusal` says why
        ``from_pretrained`` cannot rebuild the model."""
        shapes = self._layer_shapes()
        for cfg in self._configs():
            cfg.hidden_size = self._patch.out_channels
            cfg.num_hidden_layers = len(self._layers())
            if len(shapes) == 1:
                heads, width, hidden = next(iter(shapes))
                cfg.num_attention_heads = heads
                if self._has_head_dim():
                    cfg.head_dim = width // heads
                self._set_mlp_width(cfg, hidden)

    def _configs(self) -> list:
        """The model's config, and the encoder's where it holds a copy (``_from_config`` copies it)."""
        return [self.model.config] + ([self._enc.config] if self._enc.config is not self.model.config else [])

    def _has_head_dim(self) -> bool:
        """Whether the attention reads its head size from the config's ``head_dim`` (the 5.9 layout)."""
        return all(lp.head_size == "head_dim" for _, lp in self._layers_with_parts())

    def _set_mlp_width(self, cfg, hidden: int) -> None:
        """Write the config's MLP width (``intermediate_size`` by default)."""
        cfg.intermediate_size = hidden

    def _layer_shapes(self) -> set[tuple[int, int, int]]:
        """(heads, attention width, MLP width) of every layer."""
        out = set()
        for layer, lp in self._layers_with_parts():
            att = layer.get_submodule(lp.attn)
            out.add((getattr(att, lp.num_heads), getattr(att, lp.projs[0]).out_features,
                     layer.get_submodule(lp.fc2).in_features))
        return out

    # ------------------------------------------------------------------------------------- persistence
    def build_recipe(self) -> dict:
        """The model's config (``to_dict``), the layer layout and, for an encoder model built by itself, the
        constructor's ``add_pooling_layer`` / ``use_mask_token`` (``ViTModel``, ``SwinModel``): its class is rebuilt
        from them by :meth:`build_model`."""
        extra = {}
        if self.model is self._enc:  # a task model builds its encoder with the defaults
            takes = inspect.signature(type(self._enc).__init__).parameters
            if "add_pooling_layer" in takes:
                extra["add_pooling_layer"] = getattr(self._enc, "pooler", None) is not None
            if "use_mask_token" in takes:
                extra["use_mask_token"] = getattr(self._enc.embeddings, "mask_token", None) is not None
        return {"config": self.model.config.to_dict(), "attn_implementation": self._enc.config._attn_implementation,
                "layout": self._layout_name()} | extra

    def _layout_name(self) -> str:
        """``"5.9"`` for the q_proj / o_proj layout, ``"5.0"`` for the earlier one."""
        return "5.9" if self._has_head_dim() else "5.0"

    def model_name(self) -> str:
        return f"transformers.{type(self.model).__name__}"

    @classmethod
    def config_class(cls, name: str):
        """The transformers config class of class ``name``."""
        raise NotImplementedError

    @classmethod
    def build_model(cls, model_name: str, kwargs: dict) -> nn.Module:
        """``transformers.<class>(<Config>(**config))``; refused when the installed transformers writes the layers
        another way than the one that saved them."""
        import transformers

        name = model_name.removeprefix("transformers.")
        if name not in cls.classes:
            raise UnsupportedModelError(f"{model_name} is not a class {cls.__name__} builds")
        cfg = cls._buildable(
            {k: v for k, v in kwargs["config"].items() if k not in ("transformers_version", "model_type")})
        config = cls.config_class(name)(**cfg, attn_implementation=kwargs.get("attn_implementation"))
        klass = getattr(transformers, name)
        model = klass(config, **{k: kwargs[k] for k in ("add_pooling_layer", "use_mask_token") if k in kwargs})
        saved, built = kwargs.get("layout", "5.0"), cls(model)._layout_name()
        if saved != built:
            version = kwargs["config"].get("transformers_version", "?")
            raise UnsupportedModelError(
                f"saved with transformers {version}, whose layers have the {saved} layout; the installed "
                f"transformers {transformers.__version__} has the {built} one {cls._layout_advice(saved)}")
        return model

    @classmethod
    def _buildable(cls, cfg: dict) -> dict:
        """A saved config the config class accepts: its check ``hidden_size % num_attention_heads == 0`` passes (the
        saved head counts are set after)."""
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            cfg["num_attention_heads"] = 1
        return cfg

    @classmethod
    def _layout_advice(cls, saved: str) -> str:
        """What changed between the layouts, and which transformers loads layout ``saved``."""
        return (f"(q/k/v Linears and layer paths were renamed in 5.9): load it with a transformers "
                f"{'<' if saved == '5.0' else '>='} 5.9")

    def save_native(self, directory) -> dict:
        """``save_pretrained(directory)`` where the config expresses the shape (:meth:`pretrained_refusal`)."""
        why = self.pretrained_refusal()
        if why is not None:
            return {"reason": why}
        self.model.save_pretrained(str(directory))
        return {"directory": Path(directory).name,
                "load": f"transformers.{type(self.model).__name__}.from_pretrained({str(directory)!r})"}

    def pretrained_refusal(self) -> str | None:
        """Why ``from_pretrained`` of the config cannot rebuild this model, or None: one head count and MLP width
        for every layer, and before 5.9 an attention width tied to ``hidden_size`` (``head_dim = hidden_size /
        num_attention_heads``; later configs carry a ``head_dim``)."""
        shapes = self._layer_shapes()
        d = self._enc.config.hidden_size
        if len(shapes) > 1:
            return f"layers differ in (heads, attention width, MLP width) {sorted(shapes)}"
        if not shapes:
            return None
        _, width, hidden = next(iter(shapes))
        if width != d and not self._has_head_dim():
            return (f"attention width {width} differs from hidden_size {d}: transformers before 5.9 ties them "
                    "(head_dim = hidden_size / num_attention_heads)")
        return self._mlp_refusal(hidden)

    def _mlp_refusal(self, hidden: int) -> str | None:
        """Why the config cannot express MLP width ``hidden``, or None."""
        return None


def _tensor_at(module: nn.Module, path: str) -> torch.Tensor | None:
    """The parameter or buffer at dotted ``path`` in ``module``, or None where there is none (a ``mask_token`` off)."""
    owner, _, name = path.rpartition(".")
    try:
        return getattr(module.get_submodule(owner) if owner else module, name, None)
    except AttributeError:
        return None
