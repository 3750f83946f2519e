"""The one catalogue of test models, keyed by adapter: a small random-init representative of every supported family.

Every registered adapter (:func:`vitprune_fast.arch.adapters`) needs at least one :class:`Representative` here (or
added with :func:`add_representative` by whoever registers an adapter); :func:`missing_representatives` names the
adapters without one, and the test suite fails on them. The family tests, the architecture tests and the zoo census
(``bench/zoo.py``, through :data:`TIMM_MODULES`) read this catalogue.

Representatives are tiny (32-px images, two blocks or two stages, 10 classes) so that a float64 forward takes
milliseconds, and :func:`randomize_` gives every weight, bias and norm weight a non-trivial value (timm initialises
biases to 0 and norm weights to 1, which hides slicing bugs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: timm modules whose architecture names each built-in adapter covers (``arch`` name -> modules), for the census.
TIMM_MODULES: dict[str, tuple[str, ...]] = {
    "vit": ("vision_transformer", "deit"), "swin": ("swin_transformer",), "swin_v2": ("swin_transformer_v2",),
    "swin_v2_cr": ("swin_transformer_v2_cr",), "vit_relpos": ("vision_transformer_relpos",), "eva": ("eva",),
    "beit": ("beit",), "cait": ("cait",), "pvt_v2": ("pvt_v2",), "xcit": ("xcit",),
}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (in place): 1-D tensors, tokens, position embeddings and layer scales get
    magnitudes in [0.25, 1.75] of random sign, matrices ``N(0, 1 / fan_in)``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or "token" in name or "pos_embed" in name or "gamma" in name:
                p.copy_((torch.rand(p.shape, generator=g) * 1.5 + 0.25) * torch.randn(p.shape, generator=g).sign())
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


@dataclass(frozen=True)
class Representative:
    """A small model standing for one family of an adapter.

    Attributes:
        key: a short unique name (``deit``, ``swin_v2``, ...).
        adapter: the ``arch`` name of the adapter that must handle it.
        timm_name: the timm architecture name (``library="timm"``), or the ``transformers`` / ``torchvision``
            class name.
        kwargs: ``timm.create_model`` keyword arguments (the small widths), the ``transformers`` config's, or the
            torchvision adapter's ``build_model`` kwargs (the constructor's; Swin's ``version`` and ``image_size``).
        what: what it exercises.
        core: one of the engine tests' basic configs (ViT / DeiT / Swin), as opposed to a family's representative.
    """

    key: str
    adapter: str
    timm_name: str
    kwargs: dict = field(default_factory=dict)
    what: str = ""
    core: bool = False
    library: str = "timm"

    def create(self) -> nn.Module:
        """The model as its library initialises it (on the current default device)."""
        if self.library == "torchvision":  # the class, built as its adapter rebuilds it (Swin V2's blocks by name)
            from .arch import adapter_class

            return adapter_class(self.adapter).build_model(f"torchvision.{self.timm_name}", self.kwargs)
        if self.library == "transformers":
            import transformers

            klass = getattr(transformers, self.timm_name)
            return klass(klass.config_class(**self.kwargs))
        import timm

        return timm.create_model(self.timm_name, pretrained=False, **self.kwargs)

    def build(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
        """The model at ``dtype``, randomised with ``seed``, in eval mode."""
        return randomize_(self.create().to(dtype), seed).eval()


_VIT = dict(img_size=32, patch_size=8, num_classes=10)
_SMALL = dict(img_size=32, patch_size=8, num_classes=10, depth=2, embed_dim=48, num_heads=4)
_PVT_32 = dict(input_size=(3, 32, 32))  # PVTv2 takes any size; its adapter reads the configured one (DAP's probes)
_SWIN = dict(img_size=32, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=10)
_HF_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, num_labels=10)
_HF_CLIP = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64)
_HF_SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                mlp_ratio=2.0, num_labels=10)
_TV_SWIN = dict(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                stochastic_depth_prob=0.0, num_classes=10, image_size=32)
_HF_DINOV2 = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  mlp_ratio=2)

CATALOGUE: dict[str, Representative] = {r.key: r for r in (
    # the engine tests' basic configs
    Representative("deit", "vit", "deit_tiny_patch16_224", dict(_VIT, depth=3, embed_dim=48, num_heads=3),
                   "DeiT: class token, fused qkv", core=True),
    Representative("deit_distilled", "vit", "deit_tiny_distilled_patch16_224",
                   dict(_VIT, depth=2, embed_dim=48, num_heads=3), "DeiT with a distillation token", core=True),
    Representative("vit_layerscale", "vit", "vit_small_patch16_224",
                   dict(_VIT, depth=2, embed_dim=48, num_heads=4, init_values=1e-5), "ViT with LayerScale", core=True),
    Representative("vit_no_cls", "vit", "vit_small_patch16_224",
                   dict(_VIT, depth=2, embed_dim=32, num_heads=2, class_token=False, global_pool="avg", fc_norm=True),
                   "ViT without class token, average pool, fc_norm", core=True),
    Representative("swin", "swin", "swin_tiny_patch4_window7_224",
                   dict(_SWIN, patch_size=2), "Swin V1, two stages", core=True),
    Representative("swin3", "swin", "swin_tiny_patch4_window7_224",
                   dict(img_size=32, patch_size=2, window_size=2, embed_dim=12, depths=(1, 2, 1), num_heads=(2, 2, 4),
                        num_classes=7), "Swin V1, three stages, 7 classes", core=True),
    # one representative per family
    Representative("siglip", "vit", "vit_base_patch16_siglip_224", _SMALL,
                   "attention-pooling (MAP) head, width tied to the residual"),
    Representative("aimv2", "vit", "aimv2_large_patch14_224", _SMALL, "RmsNorm everywhere, SwiGLU MLP, no class token"),
    Representative("dinov2_giant", "vit", "vit_giant_patch14_dinov2", dict(_SMALL, init_values=1e-5),
                   "SwiGLUPacked (GluMlp) MLP"),
    Representative("beit3", "vit", "beit3_base_patch16_224", _SMALL, "scale-norm in attention and in the MLP"),
    Representative("qk_norm", "vit", "vit_small_patch16_224", dict(_SMALL, qk_norm=True), "per-head q/k LayerNorm"),
    Representative("rms_mlp", "vit", "test_vit4", dict(_SMALL, mlp_ratio=3.0), "RmsNorm blocks with a plain Mlp"),
    Representative("eva02", "eva", "eva02_small_patch14_224.mim_in22k", dict(_SMALL, embed_dim=32),
                   "EVA-02: rotary, EvaAttention tied to the residual, SwiGLU with sub-norm"),
    Representative("eva_giant", "eva", "eva_giant_patch14_224.clip_ft_in1k", dict(_SMALL, embed_dim=32),
                   "EVA-1: no rope, fused qkv with separate q / v biases, tied width, dims"),
    Representative("dinov3", "eva", "vit_small_patch16_dinov3.lvd1689m", dict(_SMALL, embed_dim=32),
                   "DINOv3: DinoV3 rope, register tokens, layer scale"),
    Representative("rope_vit", "eva", "vit_base_patch16_rope_224.naver_in1k", dict(_SMALL, embed_dim=32),
                   "RoPE-ViT: AttentionRope (own width, whole heads), layer scale"),
    Representative("pe_core", "eva", "vit_pe_core_base_patch16_224", dict(_SMALL, embed_dim=32),
                   "Perception Encoder: AttentionRope + attention pool"),
    Representative("relpos", "vit_relpos", "vit_relpos_base_patch16_clsgap_224.sw_in1k", dict(_SMALL, embed_dim=32),
                   "relative-position ViT: per-block RelPosMlp, width tied to the residual"),
    Representative("relpos_shared", "vit_relpos", "vit_srelpos_small_patch16_224.sw_in1k", dict(_SMALL, embed_dim=32),
                   "relative-position ViT with one RelPosMlp shared by every block"),
    Representative("beit", "beit", "beit_base_patch16_224.in22k_ft_in22k_in1k", dict(_SMALL, embed_dim=32),
                   "BEiT: per-block relative-position tables, q / v biases via F.linear, layer scale, tied width"),
    Representative("beitv2", "beit", "beitv2_base_patch16_224.in1k_ft_in22k_in1k", dict(_SMALL, embed_dim=32),
                   "BEiT v2"),
    Representative("swin_v2", "swin_v2", "swinv2_tiny_window8_256", _SWIN,
                   "Swin V2: post-norm, cosine attention tied to the stage width, PatchMerging norm after it"),
    Representative("swin_v2_cr", "swin_v2_cr", "swinv2_cr_tiny_ns_224", _SWIN,
                   "Swin V2-CR: post-norm, main-branch norm3, PatchMerging norm before the reduction"),
    Representative("cait", "cait", "cait_xxs24_224", dict(_SMALL, embed_dim=32, depth=2, depth_token_only=2),
                   "CaiT: talking-heads attention, class-attention blocks in the head, layer scale"),
    Representative("relpos_post", "vit_relpos", "vit_relpos_small_patch16_rpn_224", dict(_SMALL, embed_dim=32),
                   "post-norm relative-position ViT (ResPostRelPosBlock)"),
    Representative("vit_post", "vit", "vit_base_patch16_rpn_224", dict(_SMALL, embed_dim=32),
                   "post-norm ViT (ResPostBlock)"),
    Representative("eva_post", "eva", "eva02_enormous_patch14_clip_224", dict(_SMALL, embed_dim=32),
                   "post-norm EVA (EvaBlockPostNorm)"),
    Representative("pvt_v2", "pvt_v2", "pvt_v2_b0",
                   dict(num_classes=10, depths=(2, 1, 1, 1), embed_dims=(16, 24, 32, 40), num_heads=(1, 2, 2, 4),
                        mlp_ratios=(2, 2, 2, 2), pretrained_cfg_overlay=_PVT_32),
                   "PVTv2: spatial-reduction attention, depthwise-conv MLP, overlapping patch embeddings"),
    Representative("pvt_v2_linear", "pvt_v2", "pvt_v2_b2_li",
                   dict(num_classes=10, depths=(1, 1, 1, 1), embed_dims=(16, 24, 32, 40), num_heads=(1, 2, 2, 4),
                        mlp_ratios=(2, 2, 2, 2), pretrained_cfg_overlay=_PVT_32), "PVTv2-li: pooled linear attention"),
    Representative("parallel_xp", "vit", "vit_base_patch16_xp_224", _SMALL,
                   "ParallelScalingBlock (ViT-22B): in_proj rows [MLP | q | k | v], qk-norm (whole heads), RMSNorm"),
    Representative("parallel_pwee", "vit", "vit_pwee_patch16_reg1_gap_256", _SMALL,
                   "ParallelScalingBlock without qk-norm: tied dims, the scale folded into in_proj's q rows"),
    Representative("parallel_things", "vit", "vit_small_patch16_18x2_224", dict(_SMALL, embed_dim=32, mlp_ratio=2.0),
                   "ParallelThingsBlock: two attentions, then two MLPs, side by side on one input"),
    Representative("diff_attn", "vit", "vit_dwee_patch16_reg1_gap_256", _SMALL,
                   "differential attention: two q/k sub-heads per head, per-head RMS sub-norm, tied, whole heads"),
    Representative("xcit", "xcit", "xcit_tiny_12_p16_224",
                   dict(_SMALL, patch_size=16, cls_attn_layers=1, mlp_ratio=2.0),
                   "XCiT: cross-covariance attention (whole heads), LPI depthwise convs + BatchNorm, conv patch "
                   "embedding, class-attention blocks"),
    Representative("hf_vit", "hf_vit", "ViTForImageClassification", dict(_HF_VIT, attn_implementation="eager"),
                   "transformers ViT classifier, eager attention", library="transformers"),
    Representative("hf_vit_sdpa", "hf_vit", "ViTModel", dict(_HF_VIT, attn_implementation="sdpa"),
                   "transformers ViTModel with its pooler (features), SDPA attention", library="transformers"),
    Representative("hf_dinov2", "hf_dinov2", "Dinov2Model", dict(_HF_DINOV2, attn_implementation="sdpa"),
                   "transformers Dinov2Model (features), layer scale, SDPA attention", library="transformers"),
    Representative("hf_dinov2_reg", "hf_dinov2", "Dinov2WithRegistersForImageClassification",
                   dict(_HF_DINOV2, use_swiglu_ffn=True, num_register_tokens=2, num_labels=10,
                        attn_implementation="eager"),
                   "transformers DINOv2 with 2 registers, SwiGLU MLP, [class | patch mean] classifier, eager "
                   "attention", library="transformers"),
    Representative("hf_deit", "hf_deit", "DeiTForImageClassificationWithTeacher",
                   dict(_HF_VIT, attn_implementation="sdpa"),
                   "transformers DeiT with its teacher head (class and distillation tokens, two classifiers), SDPA "
                   "attention", library="transformers"),
    Representative("hf_clip", "hf_clip", "CLIPVisionModelWithProjection",
                   dict(_HF_CLIP, projection_dim=24, attn_implementation="sdpa"),
                   "transformers CLIP vision tower with visual_projection (features of its own width), pre_layrnorm, "
                   "SDPA attention", library="transformers"),
    Representative("hf_clip_eager", "hf_clip", "CLIPVisionModel", dict(_HF_CLIP, attn_implementation="eager"),
                   "transformers CLIPVisionModel (pooler_output: the class token after post_layernorm), eager "
                   "attention", library="transformers"),
    Representative("hf_siglip", "hf_siglip", "SiglipVisionModel", dict(_HF_CLIP, attn_implementation="sdpa"),
                   "transformers SigLIP vision tower: no class token, attention-pool head (nn.MultiheadAttention with "
                   "a probe query, tied to the residual), SDPA attention", library="transformers"),
    Representative("hf_siglip_nohead", "hf_siglip", "SiglipVisionModel",
                   dict(_HF_CLIP, vision_use_head=False, attn_implementation="eager"),
                   "transformers SigLIP vision tower without its head (mean of the final tokens), eager attention",
                   library="transformers"),
    Representative("hf_swin", "hf_swin", "SwinForImageClassification", dict(_HF_SWIN, attn_implementation="eager"),
                   "transformers Swin classifier: window attention with a per-head relative-position bias table, "
                   "shifted windows, patch merging, eager attention", library="transformers"),
    Representative("hf_swin_sdpa", "hf_swin", "SwinModel", dict(_HF_SWIN),
                   "transformers SwinModel with its pooler (features), the library's default attention (SDPA; eager "
                   "in 5.0, whose Swin has no SDPA)", library="transformers"),
    Representative("tv_vit", "tv_vit", "VisionTransformer",
                   dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                        num_classes=10), "torchvision VisionTransformer (nn.MultiheadAttention, packed in_proj)",
                   library="torchvision"),
    Representative("tv_swin", "tv_swin", "SwinTransformer", _TV_SWIN,
                   "torchvision Swin V1 (swin_t's class): functional window attention tied to its stage, per-head "
                   "bias table, PatchMerging", library="torchvision"),
    Representative("tv_swin_v2", "tv_swin", "SwinTransformer", dict(_TV_SWIN, version=2),
                   "torchvision Swin V2 (swin_v2_t's class): post-norm blocks, cosine attention with its position-bias "
                   "MLP, PatchMergingV2", library="torchvision"),
)}


def add_representative(rep: Representative) -> Representative:
    """Add a representative (e.g. for an adapter a user registers); its key must be new."""
    if rep.key in CATALOGUE:
        raise ValueError(f"a representative called {rep.key!r} is already in the catalogue")
    CATALOGUE[rep.key] = rep
    return rep


def remove_representative(key: str) -> None:
    """Remove a representative added by :func:`add_representative` (no-op when absent)."""
    CATALOGUE.pop(key, None)


def representatives(adapter: str | None = None, core: bool | None = None) -> list[Representative]:
    """The catalogue's representatives, of one adapter (``arch`` name) and/or only core / only family ones."""
    return [r for r in CATALOGUE.values()
            if (adapter is None or r.adapter == adapter) and (core is None or r.core == core)]


def missing_representatives() -> list[str]:
    """``arch`` names of the registered adapters that have no representative in the catalogue."""
    from .arch import adapters

    have = {r.adapter for r in CATALOGUE.values()}
    return [cls.arch for cls in adapters() if cls.arch not in have]


def timm_representatives(**kwargs) -> list[Representative]:
    """:func:`representatives` of timm models only."""
    return [r for r in representatives(**kwargs) if r.library == "timm"]


def census_modules() -> tuple[str, ...]:
    """Every timm module the built-in adapters cover, in catalogue order (the census's name list)."""
    return tuple(m for mods in TIMM_MODULES.values() for m in mods)


__all__ = ["CATALOGUE", "Representative", "TIMM_MODULES", "add_representative", "census_modules",
           "missing_representatives", "randomize_", "remove_representative", "representatives", "timm_representatives"]
