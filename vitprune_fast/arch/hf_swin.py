"""Hugging Face ``transformers`` Swin: ``SwinModel`` and ``SwinForImageClassification``.

Stage s is ``encoder.layers.{s}`` (a ``SwinStage``): its ``SwinLayer`` blocks, then a ``SwinPatchMerging``
(``norm`` over the 4 neighbours concatenated, ``[x0 | x1 | x2 | x3]`` each C wide, then ``reduction`` to the next
stage's width) that ends every stage but the last. A ``SwinLayer`` is the pre-norm layer :mod:`.hf_common` reads
(``layernorm_before`` / ``layernorm_after``; windowed, shifted in every other block), written two ways:

- transformers 5.0: ``attention.self.query / key / value`` with ``relative_position_bias_table`` (one column per
  head), ``attention.output.dense``, ``intermediate.dense -> output.dense``; the attention divides by
  ``sqrt(attention_head_size)`` itself (no scale attribute: a head merge cannot be put on a masked copy);
- later 5.x: ``attention.q_proj / k_proj / v_proj / o_proj`` and ``attention.relative_position_bias``'s table,
  ``mlp.fc1 -> fc2``; eager or SDPA attention with ``scaling``.

The attention reshapes its output to its own width (``all_head_size`` / ``-1``), so its dims and heads are pruned
freely; a removed head takes its bias-table column. Groups: ``swin.encoder.layers.{s}.residual`` (the patch
embedding, ``embeddings.norm`` and its tokens at stage 0, the previous merging's ``reduction`` rows after; its
blocks; this stage's merging's ``norm`` and ``reduction`` columns, four times; the final ``layernorm`` and the
classifier's columns after the last), ``...layers.{s}.blocks.{b}.attention`` and ``...blocks.{b}.mlp`` (5.0:
``.intermediate``). Outputs: a classifier's ``logits``; a ``SwinModel``'s ``pooler_output`` (the mean of the final
tokens), or without a pooler that mean of ``last_hidden_state``.

``from_pretrained`` rebuilds the shape where ``SwinConfig`` expresses it: stage widths ``embed_dim * 2**s``, one
head count per stage with the attention as wide as its stage (``head_dim = dim / heads``), and one ``mlp_ratio``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..space import Group, PruningSpace, TensorSlice
from .base import StageRef, Trunk, mlp_ratio_for
from .common import conv_out_slices, linear_slices, merged_grids, norm_slices
from .hf_common import HfEncoderAdapter, layer_parts


class _Merging(nn.Module):
    """A stage's ``SwinPatchMerging`` as a trunk entry (``wraps``): called with the token grid it merges."""

    def __init__(self, merging: nn.Module, grid: tuple[int, int]):
        super().__init__()
        self.wraps, self.grid = merging, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wraps(x, self.grid)


class HfSwinAdapter(HfEncoderAdapter):
    """``transformers`` ``SwinModel`` / ``SwinForImageClassification`` (either layout; eager and SDPA attention)."""

    arch = "hf_swin"
    classes = ("SwinModel", "SwinForImageClassification")
    base_attr = "swin"
    layer_classes = ("SwinLayer",)
    pre_norms = ()

    # ------------------------------------------------------------------------------------------ helpers
    def _stages(self) -> list[nn.Module]:
        return list(self._enc.encoder.layers)

    def _stage_path(self, s: int) -> str:
        return f"{self._base}encoder.layers.{s}"

    def _named_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"{self._stage_path(s)}.blocks.{b}", blk) for s, st in enumerate(self._stages())
                for b, blk in enumerate(st.blocks)]

    def _widths(self) -> list[int]:
        """Each stage's residual width, from the tensors."""
        return [self._patch.out_channels if s == 0 else self._stages()[s - 1].downsample.reduction.out_features
                for s in range(len(self._stages()))]

    def _grids(self) -> list[tuple[int, int]]:
        """Each stage's token grid: the patch grid, halved (rounding up) by every merging."""
        return merged_grids(self.input_size()[1:], self._patch.stride, len(self._stages()))

    def _check(self) -> None:
        super()._check()
        stages = self._stages()
        for s, st in enumerate(stages):
            down = st.downsample
            last = s == len(stages) - 1
            if (down is None) != last or (down is not None and type(down).__name__ != "SwinPatchMerging"):
                raise UnsupportedModelError(f"{self._stage_path(s)}.downsample: {type(down).__name__} is not "
                                            "supported (a SwinPatchMerging ends every stage but the last)")

    # ------------------------------------------------------------------------------------------ structure
    def describe(self) -> PruningSpace:
        """``encoder.layers.{s}.residual`` and the attention and MLP groups of its blocks (module docstring)."""
        self._check()
        m, b = self.model, self._base
        groups: dict[str, Group] = {}
        stages, widths = self._stages(), self._widths()
        for s, st in enumerate(stages):
            p = self._stage_path(s)
            if s == 0:
                res = conv_out_slices(m, f"{b}{self.patch_path}") + norm_slices(m, f"{b}embeddings.norm")
                res += self._token_slices()
            else:
                res = linear_slices(m, f"{self._stage_path(s - 1)}.downsample.reduction", "out")
            layer_groups: dict[str, Group] = {}
            for i, blk in enumerate(st.blocks):
                res += self._layer_space(f"{p}.blocks.{i}", blk, f"{p}.residual", layer_groups)
            if st.downsample is not None:  # [x0 | x1 | x2 | x3], each this stage's width
                d = f"{p}.downsample"
                res += norm_slices(m, f"{d}.norm", repeats=4, stride=widths[s])
                res += linear_slices(m, f"{d}.reduction", "in", repeats=4, stride=widths[s])
            else:
                res += norm_slices(m, f"{b}{self.final_norm}") + self._head_slices()
            groups[f"{p}.residual"] = Group(f"{p}.residual", "residual", widths[s], res, module=p)
            groups |= layer_groups
        return PruningSpace(self.arch, groups)

    def _token_names(self) -> tuple[str, ...]:
        return "mask_token", "position_embeddings"

    def _head_tables(self, path: str, att: nn.Module) -> list[TensorSlice]:
        """The relative-position bias table ``[(2w-1)^2, heads]``: a removed head takes its column."""
        owner = "" if hasattr(att, "relative_position_bias_table") else ".relative_position_bias"
        return [TensorSlice(f"{path}{owner}.relative_position_bias_table", 1, per_head=True)]

    def stages(self) -> list[StageRef]:
        out, index = [], 0
        for s, (st, width, grid) in enumerate(zip(self._stages(), self._widths(), self._grids(), strict=True)):
            p = self._stage_path(s)
            refs = []
            for i, blk in enumerate(st.blocks):
                refs.append(self._block_ref(index, s, f"{p}.blocks.{i}", blk))
                index += 1
            entry = f"{self._stage_path(s - 1)}.downsample" if s else None
            out.append(StageRef(s, tuple(refs), f"{p}.residual", entry, width, grid))
        return out

    def trunk(self, tokens: bool = False) -> Trunk:
        """Blocks get their stage's grid (``input_dimensions``); a stage starts with the previous stage's merging,
        called with that stage's grid -- and those of any stages before it without blocks."""
        t = super().trunk(tokens)
        stages, grids = self.stages(), self._grids()
        starts, pending = {}, []
        for st in stages:
            if st.entry is not None:
                pending.append(_Merging(self.model.get_submodule(st.entry), grids[st.index - 1]))
            if st.blocks:
                if pending:
                    starts[st.blocks[0].index] = pending[0] if len(pending) == 1 else nn.Sequential(*pending)
                pending = []
        if pending:  # trailing stages without blocks: their mergings run before the head
            head, merges = t.head_fn, nn.Sequential(*pending)
            t.head_fn = lambda x: head(merges(x))
        stage_of = t.stage_of
        t.stage_start = starts
        t.block_kwargs = lambda i: {"input_dimensions": grids[stage_of[i]]}
        return t

    def skipped_block(self, x: torch.Tensor, *args, **kwargs):
        """A ``SwinLayer`` returns ``(hidden states, attention weights)`` (its stage takes the first)."""
        return x, None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x, _ = self._enc.embeddings(images.to(self._patch.weight.dtype))
        return x

    def embed_modules(self) -> list[nn.Module]:
        return [self._enc.embeddings]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final ``layernorm``, the mean over tokens (the pooler), the classifier."""
        enc = self._enc
        x = enc.layernorm(x)
        pooled = enc.pooler(x.transpose(1, 2)).flatten(1) if enc.pooler is not None else x.mean(1)
        clf = getattr(self.model, "classifier", None)
        return clf(pooled) if clf is not None and self.model is not enc else pooled

    def output(self, out) -> torch.Tensor:
        if hasattr(out, "logits"):
            return out.logits
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state.mean(1)

    # ---------------------------------------------------------------------------------------- mutation
    def set_stage_blocks(self, stage: int, blocks: list[nn.Module]) -> None:
        self._stages()[stage].blocks = nn.ModuleList(blocks)
        self._sync_config()

    def sync_attributes(self) -> None:
        """The layers' head attributes (:class:`~.hf_common.HfEncoderAdapter`), the stages' and mergings' ``dim``
        (5.0), ``num_features`` and the config (:meth:`_sync_config`)."""
        super().sync_attributes()
        widths = self._widths()
        for st, c in zip(self._stages(), widths, strict=True):
            if hasattr(st, "dim"):
                st.dim = c
            if st.downsample is not None and hasattr(st.downsample, "dim"):
                st.downsample.dim = c
        self._enc.num_features = widths[-1]

    def _stage_shapes(self) -> list[set[tuple[int, int, int]]]:
        """(heads, attention width, MLP width) of each stage's blocks."""
        out = []
        for st in self._stages():
            shapes = set()
            for blk in st.blocks:
                lp = layer_parts(blk)
                att = blk.get_submodule(lp.attn)
                shapes.add((getattr(att, lp.num_heads), getattr(att, lp.projs[0]).out_features,
                            blk.get_submodule(lp.fc2).in_features))
            out.append(shapes)
        return out

    def _layer_shapes(self) -> set[tuple[int, int, int]]:
        return set().union(*self._stage_shapes())

    def _sync_config(self) -> None:
        """``depths`` always (the module tree); where :meth:`pretrained_refusal` finds the shape expressible,
        ``embed_dim``, ``hidden_size``, ``num_heads`` and ``mlp_ratio`` too (else the unpruned values, which
        rebuild the tree)."""
        depths = [len(st.blocks) for st in self._stages()]
        fits = self.pretrained_refusal() is None  # then there is one mlp_ratio, and one head count per stage
        widths, shapes, ratio = self._widths(), self._stage_shapes(), self._mlp_ratio()
        for cfg in self._configs():
            cfg.depths = depths
            if fits:
                cfg.embed_dim, cfg.hidden_size, cfg.mlp_ratio = widths[0], widths[-1], ratio
                cfg.num_heads = [min(sh)[0] if sh else h for sh, h in zip(shapes, cfg.num_heads, strict=True)]

    def _mlp_ratio(self) -> float | None:
        """One ``mlp_ratio`` whose ``int(ratio * width)`` is every stage's MLP width, or None."""
        pairs = [(w, h) for w, sh in zip(self._widths(), self._stage_shapes(), strict=True) for _, _, h in sh]
        for w, h in pairs:
            r = mlp_ratio_for(w, h)
            if all(int(r * w2) == h2 for w2, h2 in pairs):
                return r
        return None if pairs else float(self._enc.config.mlp_ratio)

    def pretrained_refusal(self) -> str | None:
        """Why ``SwinConfig`` cannot express this shape, or None (module docstring)."""
        widths = self._widths()
        if any(w != widths[0] * 2 ** s for s, w in enumerate(widths)):
            return f"stage widths {widths} are not embed_dim * 2**stage (SwinConfig derives them from embed_dim)"
        for s, (w, shapes) in enumerate(zip(widths, self._stage_shapes(), strict=True)):
            if len(shapes) > 1:
                return f"stage {s}'s blocks differ in (heads, attention width, MLP width) {sorted(shapes)}"
            if shapes and next(iter(shapes))[1] != w:
                return (f"stage {s}'s attention width {next(iter(shapes))[1]} differs from its width {w}: Swin ties "
                        "them (head_dim = dim / num_heads)")
        if self._mlp_ratio() is None:
            return "no one mlp_ratio gives every stage's MLP width (int(mlp_ratio * dim))"
        return None

    # ------------------------------------------------------------------------------------- persistence
    @classmethod
    def _buildable(cls, cfg: dict) -> dict:
        return cfg  # the config keeps shapes it can build (_sync_config); the saved head counts are set after

    def _layout_name(self) -> str:
        """``"q_proj"`` for the later attention, ``"query"`` for 5.0's."""
        layers = self._layers()
        return layer_parts(layers[0]).projs[0] if layers else "q_proj"

    @classmethod
    def _layout_advice(cls, saved: str) -> str:
        return ("(transformers rewrote Swin's attention after 5.0): load it with a transformers of the layout that "
                "saved it")

    def inits_buffers_of(self, module: nn.Module) -> bool:
        """The later layout's ``SwinRelativePositionBias`` keeps its index as a non-persistent buffer."""
        return type(module).__name__ == "SwinRelativePositionBias"

    def init_buffers(self) -> None:
        """Each ``relative_position_index``, computed as the module computes it (from its window)."""
        for m in self.model.modules():
            if self.inits_buffers_of(m):
                device = m.relative_position_bias_table.device
                m.relative_position_index = m._create_relative_position_index().view(-1).to(device)

    def extra_state(self) -> dict:
        """Each block's shift (and window): after depth pruning it no longer follows the even/odd rule the config
        rebuilds."""
        return {p: {"shift_size": int(blk.shift_size), "window_size": int(blk.window_size)}
                for p, blk in self._named_layers()}

    def apply_extra_state(self, state: dict) -> None:
        for path, d in state.items():
            blk = self.model.get_submodule(path)
            blk.shift_size, blk.window_size = int(d["shift_size"]), int(d["window_size"])

    @classmethod
    def config_class(cls, name: str):
        from transformers import SwinConfig

        return SwinConfig


__all__ = ["HfSwinAdapter"]
