"""The adapter contract: one model family's structure, the only place that knows it.

Everything above the pruning core -- the UP-ViTs engines, DAP, DIMAP, depth pruning, FLOPs targets, persistence --
asks an :class:`Adapter` for blocks, stages, the trunk and sizes; none of them walks ``model.blocks`` or
``model.layers``. Adding a model family means one subclass (one file) registered with
:func:`vitprune_fast.arch.register_adapter`, and its tests.

The blocks an adapter reports are pre-norm transformer blocks with two residual branches::

    x = x + ls1(attn(norm1(x)))        attn: fused qkv Linear -> heads -> [scale-norm] -> proj Linear
    x = x + ls2(mlp(norm2(x)))         mlp: fc1 Linear(s) -> act [x gate] -> [sub-norm] -> fc2 Linear

(norm1 / norm2: LayerNorm or RMSNorm), which is what the UP-ViTs deltas (rank-1 MLP units at fc2's input, masked
qkv rows), DAP's gates and DIMAP's module pools rely on. Variations a BlockRef can say: post-norm branches
(``post_norm``), q/k/v made without a called fused Linear (``taps``, ``qkv_functional``), several pairs side by
side on one input (``parallel``), one pair fused into shared Linears (a group's slices carry its rows; its branch
outputs are named in ``branch_outputs``), and residual branches no group lives in before the MLP (XCiT's local
patch interaction: the engines rerun whole blocks). A family whose blocks differ otherwise must say so with a clear
``UnsupportedModelError`` in :meth:`Adapter.describe`.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..space import Group, PruningSpace, tensor_of
from .common import QRows, has_parameter


@dataclass(frozen=True)
class BlockRef:
    """One transformer block, by module paths in the model (see the module docstring for its shape).

    Attributes:
        index: position in forward order, across stages.
        stage: index of the stage it belongs to.
        path: module path of the block (``blocks.3``, ``layers.1.blocks.0``).
        attn: module path of its attention; also the name of its ``attn`` group.
        mlp: module path of its MLP; also the name of its ``mlp`` group.
        norm1, norm2: the LayerNorms in front of the attention and the MLP branch.
        qkv, proj: the attention's fused q/k/v Linear and output Linear.
        fc1, act, fc2: the MLP's input Linear (SwiGLU: its value projection ``fc1_x``), activation and output
            Linear; a hidden unit is an input channel of ``fc2`` (the MLP group's slices list every tensor).
        ls1, ls2: the layer-scale tensor (``gamma``) of the attention / MLP branch, or None.
        taps: where an attention without a called fused qkv Linear exposes q, k and v to the UP-ViTs engine:
            module paths whose INPUTS are q ``[B, H, N, hd]``, k ``[B, H, N, hd]`` and the attention output
            ``[B, N, A]`` (zeroing v_d zeroes output d); None for a fused ``qkv`` Linear that is called.
        qkv_functional: the fused ``qkv`` weight is applied with ``F.linear`` (separate q / v biases: BEiT), so its
            output is tapped by weight instead of by a module hook.
        post_norm: ``x = x + norm1(attn(x))``, ``x = x + norm2(mlp(x))`` (Swin V2): the norms sit on the branch
            outputs, so an MLP unit's change is not rank-1 at the block output and removing a branch zeroes its norm.
        branch_outputs: module paths whose outputs are the attention's and the MLP's contributions (zeroed to
            remove a branch), when not ``attn`` / ``mlp`` (post-norm: ``norm1`` / ``norm2``; a parallel block, whose
            ``attn`` / ``mlp`` name groups and no module: its two output projections).
        parallel: the block's other attention / MLP pairs when several run side by side on one input
            (``ParallelThingsBlock``: ``x + sum_j attn_j(x)``, then ``+ sum_j mlp_j(.)``), each a BlockRef with this
            block's index and path; this one is the first pair. :meth:`branches` lists them all.
    """

    index: int
    stage: int
    path: str
    attn: str
    mlp: str
    norm1: str
    norm2: str
    qkv: str
    proj: str
    fc1: str
    act: str
    fc2: str
    ls1: str | None = None
    ls2: str | None = None
    taps: tuple[str, str, str] | None = None
    qkv_functional: bool = False
    post_norm: bool = False
    branch_outputs: tuple[str, str] | None = None
    parallel: tuple[BlockRef, ...] = ()

    def branches(self) -> tuple[BlockRef, ...]:
        """Every attention / MLP pair of the block (one, unless it runs several in parallel)."""
        return (self, *self.parallel)

    def branch_of(self, group: str) -> BlockRef:
        """The pair whose attention or MLP group is ``group``."""
        return next(b for b in self.branches() if group in (b.attn, b.mlp))

    def branch_output(self, part: str) -> str:
        """The module whose output is branch ``part``'s (``"attn"`` / ``"mlp"``) contribution to the stream."""
        if self.branch_outputs is not None:
            return self.branch_outputs[part == "mlp"]
        if self.post_norm:
            return self.norm1 if part == "attn" else self.norm2
        return self.attn if part == "attn" else self.mlp

    @classmethod
    def pre_norm(cls, model: nn.Module, index: int, stage: int, path: str,
                 gammas: tuple[str, str] = ("ls1.gamma", "ls2.gamma"), **fields) -> BlockRef:
        """The reference for timm's pre-norm blocks (``norm1 attn norm2 mlp`` children).

        Args:
            gammas: the layer-scale tensors of the two branches, relative to the block (timm ``LayerScale`` modules
                by default; ``gamma_1`` / ``gamma_2`` parameters in BEiT / CaiT); an absent one means none.
            **fields: any other :class:`BlockRef` field (``qkv_functional``...).
        """
        blk = model.get_submodule(path)
        fc1 = "fc1_x" if hasattr(blk.mlp, "fc1_x") else "fc1"  # SwiGLU: the value projection (fc1_g gates it)
        ls1, ls2 = (f"{path}.{g}" if has_parameter(blk, g) else None for g in gammas)
        return cls(index, stage, path, f"{path}.attn", f"{path}.mlp", f"{path}.norm1", f"{path}.norm2",
                   f"{path}.attn.qkv", f"{path}.attn.proj", f"{path}.mlp.{fc1}", f"{path}.mlp.act",
                   f"{path}.mlp.fc2", ls1, ls2, **fields)


@dataclass(frozen=True)
class StageRef:
    """Consecutive blocks with one residual width and one token grid.

    Attributes:
        index: stage index (ViT: a single stage 0).
        blocks: its blocks in forward order.
        residual: name of the residual group carried by its blocks.
        entry: module path run right before its first block (Swin: the PatchMerging), or None.
        width: residual width C of its blocks.
        grid: ``(h, w)`` patch-token grid of its blocks.
        prefix_tokens: class / distillation / register tokens in front of the patch tokens.
        has_cls: whether token 0 is a class token (else a pooled head reads the patch tokens).
    """

    index: int
    blocks: tuple[BlockRef, ...]
    residual: str
    entry: str | None
    width: int
    grid: tuple[int, int]
    prefix_tokens: int = 0
    has_cls: bool = False


@dataclass
class Trunk:
    """``model(images)`` as a flat sequence, so a pass can start at any block (eval mode).

    ``embed -> [enter(i) -> blocks[i]] for every block i -> head``; ``enter`` runs a stage's entry module (Swin
    PatchMerging) in front of its first block and is the identity elsewhere. Get one from
    ``adapter_for(model).trunk()``.

    Attributes:
        blocks: block modules in forward order.
        names: module path of each block.
        stage_start: block index -> entry module run before it: a module of the model, or a wrapper calling one
            with more arguments (its ``wraps`` attribute is that module: transformers' Swin merging) or the adapter's
            own step (PVTv2's).
        stage_of: block index -> stage index.
        embed: images -> input of block 0.
        head_fn: output of the last block -> logits.
        block_kwargs: keyword arguments every block call gets (EVA: the rotary embedding), or a function of the
            block index giving them (PVTv2: its stage's token grid). A block returning a tuple (a transformers
            layer's ``(hidden states, attention weights)``) stands for its first element.
    """

    blocks: list[nn.Module]
    names: list[str]
    stage_start: dict[int, nn.Module]
    stage_of: list[int]
    embed: Callable[[torch.Tensor], torch.Tensor]
    head_fn: Callable[[torch.Tensor], torch.Tensor]
    block_kwargs: dict | Callable[[int], dict] = field(default_factory=dict)

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on ``x`` (already past the stage entry): ``blocks[i](x, **block_kwargs)``."""
        kw = self.block_kwargs(i) if callable(self.block_kwargs) else self.block_kwargs
        out = self.blocks[i](x, **kw)
        return out[0] if isinstance(out, tuple) else out  # transformers' Swin layers: (hidden states, attention)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Embedding: images -> input of block 0 (before a stage-0 entry, if any)."""
        return self.embed(images)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> logits."""
        return self.head_fn(x)

    def enter(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Apply the entry module that precedes block ``i`` (identity inside a stage)."""
        entry = self.stage_start.get(i)
        return entry(x) if entry is not None else x

    def run(self, x: torch.Tensor, start: int, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start..end-1`` (with the stage entries in between), then the head when ``end`` is None.

        Args:
            x: input of block ``start``, before the entry module that begins its stage (if any).
        """
        stop = len(self.blocks) if end is None else end
        for i in range(start, stop):
            x = self.block(i, self.enter(x, i))
        return self.head(x) if end is None else x

    def block_index(self, module_path: str) -> int:
        """Index of the block that owns ``module_path`` (e.g. ``blocks.3.attn`` -> 3)."""
        for i, name in enumerate(self.names):
            if module_path == name or module_path.startswith(name + "."):
                return i
        raise KeyError(module_path)

    def teacher(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Inputs of every block (before any stage entry) and the logits."""
        x = self.prefix(images)
        inputs = []
        for i in range(len(self.blocks)):
            inputs.append(x)
            x = self.block(i, self.enter(x, i))
        return inputs, self.head(x)


class Adapter(ABC):
    """One model family's structure, bound to one model (``adapter_for(model)`` returns it).

    Subclasses implement the abstract methods, and :meth:`q_rows` (which the contract cannot guess: a family's
    attention names its q projection its own way); the concrete ones derive everything else from them. Results reflect
    the model as it is when called: ask again after depth pruning (block lists change) -- width pruning keeps
    every module and path.

    Attributes:
        arch: short family name, recorded in saved models (``vit``, ``swin``).
        model: the bound model.
    """

    arch: ClassVar[str]

    def __init__(self, model: nn.Module):
        self.model = model

    # ------------------------------------------------------------------------------------------- identity
    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter is the one for ``model`` (cheap: a type check, no validation)."""

    # ------------------------------------------------------------------------------------------ structure
    @abstractmethod
    def describe(self) -> PruningSpace:
        """Every prunable group with all its tensor slices; ``UnsupportedModelError`` naming what is not."""

    @abstractmethod
    def stages(self) -> list[StageRef]:
        """The stages in forward order (possibly a stage without blocks)."""

    def blocks(self) -> list[BlockRef]:
        """Every block in forward order, across stages."""
        return [b for s in self.stages() for b in s.blocks]

    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the input of block 0 (before a stage-0 entry module)."""

    @abstractmethod
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> logits (final norm, pooling, classifier)."""

    def output(self, out) -> torch.Tensor:
        """The tensor ``model(images)`` stands for: the output itself (timm), or the logits / features in the output
        object a library's model returns (transformers). Call :func:`vitprune_fast.arch.model_output`."""
        return out

    @abstractmethod
    def embed_modules(self) -> list[nn.Module]:
        """Modules :meth:`embed` runs (a residual LayerNorm among them means scoring starts from the images)."""

    @abstractmethod
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the model expects."""

    def accepts_size(self, h: int, w: int) -> bool:
        """Whether the model takes ``h x w`` images: its :meth:`input_size`, unless its patch embedding takes any
        size (timm's ``dynamic_img_size=True`` or ``strict_img_size=False``)."""
        pe = getattr(self.model, "patch_embed", None)
        if pe is not None and (getattr(pe, "dynamic_img_size", False) or getattr(pe, "strict_img_size", True) is False):
            return True
        return (h, w) == tuple(self.input_size()[1:])

    def attention_bias(self, block: BlockRef, windows: int) -> torch.Tensor | None:
        """What the attention of ``block`` adds to ``scale * q k^T`` before the softmax, broadcastable to
        ``[windows, heads, T, T]`` (``windows``: the attention's batch); None when nothing is added (plain ViT)."""
        return None

    @abstractmethod
    def classifier_weights(self) -> list[torch.Tensor]:
        """The weights ``[classes, features]`` of the final Linear layer(s) whose outputs make the logits.

        The logits move only inside the span of their columns, which is all the screened UP-ViTs engine needs.
        """

    def num_classes(self) -> int:
        """The classifier's number of classes (timm's ``num_classes``), 0 for a model without one."""
        return int(getattr(self.model, "num_classes", 0) or 0)

    def output_group(self) -> str | None:
        """The group whose channels are the model's output features one to one, or None.

        A model without a classifier whose head passes its last stage's residual through (a final norm, pooling)
        outputs that residual's channels: removing channel c removes output feature c (the features objective
        counts it as 0, as a downstream Linear without its input column sees it). None for a classifier, and where a
        head of its own width makes the features (timm's attention pool).
        """
        if self.classifier_weights():
            return None
        stages = self.stages()
        return stages[-1].residual if stages else None

    def final_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> the model's final tokens (``[B, N, C]`` or ``[B, H, W, C]``): what its library
        calls them (timm's ``forward_features``, transformers' ``last_hidden_state``), for the final-tokens
        objective. Families whose adapter names none refuse it."""
        raise self._no_tokens()

    def model_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The final tokens of ``images`` computed by the library's own call (the reference for
        :meth:`final_tokens`)."""
        raise self._no_tokens()

    def _no_tokens(self) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.arch}: the final-tokens objective is not supported for this family (its "
                                     "adapter names no final tokens); use objective='features'")

    def residual_readers(self, group: str) -> list[nn.Module]:
        """Modules whose first input carries residual ``group``'s channels straight from a parameter, through no
        norm (SigLIP's pooling attention: its probe query); the fast engine zeroes a removed channel there, as
        removal leaves it. None by default."""
        return []

    def token_group(self) -> str | None:
        """The group whose channels are the final tokens' features: the last stage's residual."""
        stages = self.stages()
        return stages[-1].residual if stages else None

    def trunk(self, tokens: bool = False) -> Trunk:
        """The model as prefix -> blocks -> head (the KL engine's view); with ``tokens``, its head gives the final
        tokens (:meth:`final_tokens`) instead of the model's output."""
        model = self.model
        stages = self.stages()
        blocks = [b for s in stages for b in s.blocks]
        starts = {s.blocks[0].index: model.get_submodule(s.entry) for s in stages if s.entry and s.blocks}
        return Trunk([model.get_submodule(b.path) for b in blocks], [b.path for b in blocks], starts,
                     [b.stage for b in blocks], self.embed, self.final_tokens if tokens else self.head,
                     self.block_kwargs())

    def block_kwargs(self) -> dict:
        """Keyword arguments the model's forward gives every block besides its input (EVA: ``rope``)."""
        return {}

    def skipped_block(self, x: torch.Tensor, *args, **kwargs):
        """What a block replaced by the identity returns, called as the block is (the reference engine's block
        unit): its input, in the block's output form."""
        return x

    def scoring_context(self):
        """A context the UP-ViTs engines and reconstruction run the model in (torchvision's ViT: its attention
        written out, so that its ``F.linear`` calls can be tapped and its ``out_proj`` hooked); none by default."""
        return contextlib.nullcontext()

    def hybrid_refusal(self) -> str | None:
        """Why this model's hybrid depth units (FFN_i + MSA_{i+1}, re-packed into one block) cannot be removed, or
        None when they can (whole blocks always can)."""
        return None

    def unit_params(self, group: Group) -> tuple[int, int]:
        """Parameters one unit of ``group`` removes: ``(per channel, per head)``.

        Per channel: every tensor slice the channel implies (``repeats`` entries along its dim, each the
        tensor's other dims); per head: the per-head tensors (Swin relative-position bias columns), which go only
        when a whole head goes. Only parameters count (a buffer sliced along is not one).
        """
        params = {id(p) for p in self.model.parameters()}
        per_channel = per_head = 0
        for sl in group.slices:
            t = tensor_of(self.model, sl.name)
            if id(t) not in params:
                continue
            per_index = t.numel() // t.shape[sl.dim]
            if sl.per_head:
                per_head += per_index
            else:
                per_channel += sl.repeats * per_index
        return per_channel, per_head

    def q_rows(self, group: Group) -> QRows:
        """The tensors and row ranges that make q in attention ``group``, read from the model as it is now.

        ``prune_`` folds the change of attention scale into these rows when a head's dim shrinks from hd to hd'
        (``q *= sqrt(hd' / hd)``, so that an attention computing ``softmax(q k^T / sqrt(head_dim))`` -- timm's SDPA
        path with its default scale -- computes what it did). It asks before anything is sliced, so that a missing
        declaration refuses the plan with the model untouched, and again after slicing and :meth:`sync_attributes`
        for the rows to fold (a ParallelScalingBlock's q rows start after its MLP rows, whose count the plan may
        change).

        Args:
            group: a group of kind ``attn`` of this model's :meth:`describe`.

        Returns:
            ``(tensor, rows)`` pairs, ``rows`` a range along dim 0: a fused qkv Linear's weight and bias rows
            ``[0, A)``, a separate q Linear's, a separate ``q_bias``...

        Raises:
            UnsupportedModelError: the adapter does not declare them (this default).
        """
        raise UnsupportedModelError(
            f"{type(self).__name__} does not declare the q projection of {group.name} (Adapter.q_rows): pruning "
            "its head dims needs the rows that make q, to fold the attention-scale change into them")

    # ---------------------------------------------------------------------------------------- mutation
    def set_heads(self, group: Group, heads: int) -> None:
        """Give attention ``group`` ``heads`` heads, after its tensors are sliced and before :meth:`sync_attributes`
        derives the sizes that follow from the count (by default: the ``num_heads`` of ``group.module``)."""
        self.model.get_submodule(group.module).num_heads = heads

    def regroup_heads_masked(self, group: Group, heads: int) -> None:
        """Re-group attention ``group`` into ``heads`` heads at its original width, keeping the original per-dim
        scale: what the pruned model computes after a head merge, on a masked copy (``masked_copy``).

        By default: ``num_heads``, ``head_dim`` (where the module keeps one) and ``scale`` of ``group.module``, and
        the explicit attention path (``fused_attn = False``: SDPA would use 1/sqrt(new head dim)).
        """
        attn = self.model.get_submodule(group.module)
        attn.num_heads = heads
        if hasattr(attn, "head_dim"):
            attn.head_dim = group.size // heads
        attn.scale = group.head_dim ** -0.5  # the per-dim scale of the original heads
        attn.fused_attn = False  # SDPA would use 1/sqrt(new head dim)

    @abstractmethod
    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        """Replace stage ``stage``'s blocks with ``blocks`` (depth pruning), keeping attributes consistent."""

    @abstractmethod
    def sync_attributes(self) -> None:
        """Derive every size attribute from the tensors (after slicing, or when rebuilding from a checkpoint)."""

    # ------------------------------------------------------------------------------------- persistence
    def model_name(self) -> str | None:
        """The name :meth:`build_model` rebuilds the model from: timm's architecture name (its ``pretrained_cfg``),
        or None when the model does not say (the caller must)."""
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return cfg.get("architecture")

    @classmethod
    def build_model(cls, model_name: str, kwargs: dict) -> nn.Module:
        """A fresh model (random weights, on the current default device) from :meth:`model_name` and
        :meth:`build_recipe`: ``timm.create_model(model_name, pretrained=False, **kwargs)``."""
        import timm

        return timm.create_model(model_name, pretrained=False, **kwargs)

    @abstractmethod
    def build_recipe(self) -> dict:
        """Structural ``timm.create_model`` kwargs that rebuild the module tree (sizes are restored apart)."""

    def stock_kwargs(self) -> dict:
        """``timm.create_model`` kwargs that build this model, widths included, as a stock timm model.

        Raises:
            UnsupportedModelError: the widths are not ones the family's timm class can express (per-block widths
                differ, an attention width timm ties to another size...), with the reason.
        """
        raise UnsupportedModelError(f"no stock timm recipe for {type(self.model).__name__} models")

    def save_native(self, directory) -> dict | None:
        """Also write the model in its library's own format when it can express the (pruned) shape: returns what
        ``architecture.json`` records about it (``{"directory", "load"}`` or ``{"reason"}``), or None when the
        library has no such format beyond :func:`~vitprune_fast.io.save_pruned`'s (timm: see ``timm_stock``)."""
        return None

    def inits_buffers_of(self, module: nn.Module) -> bool:
        """Whether :meth:`init_buffers` computes ``module``'s non-persistent buffers (which a model built on the meta
        device lacks); none by default."""
        return False

    def init_buffers(self) -> None:  # noqa: B027 -- optional hook, nothing to compute by default
        """Compute the non-persistent buffers :meth:`inits_buffers_of` names, on a model materialised from meta."""

    def extra_state(self) -> dict:
        """JSON-able state the recipe cannot express (e.g. Swin's per-block shift layout after depth pruning)."""
        return {}

    def apply_extra_state(self, state: dict) -> None:  # noqa: B027 -- optional hook, nothing to restore by default
        """Restore :meth:`extra_state` on a freshly built model."""


def mlp_ratio_for(dim: int, hidden: int) -> float:
    """An ``mlp_ratio`` for which timm's ``int(dim * mlp_ratio)`` gives ``hidden`` (timm truncates)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim
