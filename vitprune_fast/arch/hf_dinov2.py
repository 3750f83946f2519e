"""Hugging Face ``transformers`` DINOv2: ``Dinov2Model`` / ``Dinov2ForImageClassification`` and the register-token
variant ``Dinov2WithRegistersModel`` / ``Dinov2WithRegistersForImageClassification``.

A ``Dinov2Layer`` is the pre-norm layer :mod:`.hf_common` reads (``norm1`` / ``norm2``, a per-channel layer scale
``layer_scale{1,2}.lambda1`` on both branches, an ``fc1 / fc2`` MLP or a SwiGLU one). Groups:
``encoder.layer.3.attention`` and ``encoder.layer.3.mlp`` (``dinov2.`` in front in a classifier) and ``residual``,
which also covers the class, mask and register tokens and the layer scales.

Outputs: a classifier's ``logits`` (a Linear over ``[class token | mean of the patch tokens]``, registers left out);
a ``Dinov2Model``'s ``pooler_output``, the class token of its final ``layernorm`` -- the features objective scores it.
"""
from __future__ import annotations

import copy

import torch

from ..space import TensorSlice
from .hf_common import HfEncoderAdapter

_REGISTERS = ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification")


class HfDinov2Adapter(HfEncoderAdapter):
    """``transformers`` DINOv2 with or without registers (eager and SDPA attention; either layout)."""

    arch = "hf_dinov2"
    classes = ("Dinov2Model", "Dinov2ForImageClassification", *_REGISTERS)
    layer_classes = ("Dinov2Layer", "Dinov2WithRegistersLayer")

    @property
    def base_attr(self) -> str:  # the inner model's attribute in a classifier
        return "dinov2_with_registers" if type(self.model).__name__ in _REGISTERS else "dinov2"

    def _head_slices(self) -> list[TensorSlice]:
        """The classifier reads ``[class token | patch mean]``: two column blocks per residual channel."""
        clf = getattr(self.model, "classifier", None)
        if clf is None or not hasattr(clf, "weight"):
            return []
        d = self._enc.config.hidden_size
        return [TensorSlice("classifier.weight", 1, repeats=2, stride=d)]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self._enc.layernorm(x)
        if self.model is self._enc:
            return x[:, 0]
        return self.model.classifier(torch.cat([x[:, 0], x[:, self._prefix_tokens():].mean(dim=1)], dim=1))

    def output(self, out) -> torch.Tensor:
        """A classifier's ``logits``, else ``pooler_output`` (the final class token)."""
        return out.logits if hasattr(out, "logits") else out.pooler_output

    def accepts_size(self, h: int, w: int) -> bool:
        """DINOv2 interpolates its position embeddings: any multiple of the patch size."""
        ps = self._enc.config.patch_size
        return h % ps == 0 and w % ps == 0

    @classmethod
    def config_class(cls, name: str):
        import transformers

        return transformers.Dinov2WithRegistersConfig if name in _REGISTERS else transformers.Dinov2Config

    # ------------------------------------------------------------------ the MLP width in the config (mlp_ratio)
    def _swiglu(self) -> bool:
        return bool(self._enc.config.use_swiglu_ffn)

    def _set_mlp_width(self, cfg, hidden: int) -> None:
        ratio = self._mlp_ratio(hidden)
        if ratio is not None:
            cfg.mlp_ratio = ratio

    def _mlp_ratio(self, hidden: int) -> float | int | None:
        """An ``mlp_ratio`` the config takes (5.9 on types it ``int``) that the DINOv2 classes turn back into
        ``hidden``: ``int(d * r)`` for the plain MLP; for SwiGLU, ``(int(int(d * r) * 2 / 3) + 7) // 8 * 8``; None
        when none does."""
        d = self._enc.config.hidden_size
        inner = range(hidden * 3 // 2 - 12, hidden * 3 // 2 + 13) if self._swiglu() else (hidden,)
        ratios = [*range(1, 17), *(r for f in inner for r in (f / d, (f + 0.5) / d))]
        for r in ratios:
            f = int(d * r)
            got = (int(f * 2 / 3) + 7) // 8 * 8 if self._swiglu() else f
            if got == hidden and _config_takes(self._enc.config, "mlp_ratio", r):
                return r
        return None

    def _mlp_refusal(self, hidden: int) -> str | None:
        if self._mlp_ratio(hidden) is None:
            how = ("a multiple of 8 from 2/3 of int(hidden_size * mlp_ratio)" if self._swiglu()
                   else "int(hidden_size * mlp_ratio)")
            return f"no mlp_ratio the config takes gives the MLP width {hidden} (transformers makes it {how})"
        return None



def _config_takes(cfg, name: str, value) -> bool:
    """Whether config ``cfg`` accepts ``value`` for field ``name`` (5.9's strict configs check the type)."""
    try:
        setattr(copy.copy(cfg), name, value)
    except Exception:  # huggingface_hub's StrictDataclassFieldValidationError, or a config's own
        return False
    return True
