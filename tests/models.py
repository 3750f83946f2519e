"""Small random-init timm configs for tests (32-px images), with randomised biases and norm weights."""
from __future__ import annotations

import timm
import torch

VIT_BASE = dict(img_size=32, patch_size=8, num_classes=10)
CONFIGS = {
    "deit": ("deit_tiny_patch16_224", dict(VIT_BASE, depth=3, embed_dim=48, num_heads=3)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(VIT_BASE, depth=2, embed_dim=48, num_heads=3)),
    "vit_layerscale": ("vit_small_patch16_224", dict(VIT_BASE, depth=2, embed_dim=48, num_heads=4, init_values=1e-5)),
    "vit_no_cls": ("vit_small_patch16_224", dict(VIT_BASE, depth=2, embed_dim=32, num_heads=2, class_token=False,
                                                 global_pool="avg", fc_norm=True)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                                  depths=(2, 2), num_heads=(2, 4), num_classes=10)),
    "swin3": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=2, embed_dim=12,
                                                   depths=(1, 2, 1), num_heads=(2, 2, 4), num_classes=7)),
}
VIT_KEYS = ("deit", "deit_distilled", "vit_layerscale", "vit_no_cls")
SWIN_KEYS = ("swin", "swin3")


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere: timm inits biases to 0 and norm weights to 1, which hides slicing bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or "token" in name or "pos_embed" in name or "gamma" in name:
                p.copy_((torch.rand(p.shape, generator=g) * 1.5 + 0.25) * torch.randn(p.shape, generator=g).sign())
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


def make_model(key: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    name, kw = CONFIGS[key]
    model = timm.create_model(name, pretrained=False, **kw)
    return randomize_(model.to(dtype), seed).eval()


def make_input(model: torch.nn.Module, batch: int = 3, seed: int = 1) -> torch.Tensor:
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g, dtype=p.dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_scores(space, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(gr.size, generator=g) for n, gr in space.groups.items()}
