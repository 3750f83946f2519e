"""DAP's Block Performance Indicator probes Ψ: one class-token and one patch-token classifier per block.

Block i (an attention or an MLP residual branch) owns a probe pair Ψ_i that is applied to the residual
stream before the branch (``x_i``) and after it (``x_{i+1}``); ΔΨ_i = L(Ψ_i(x_i)) − L(Ψ_i(x_{i+1})).

- Ψ^c (class token): ``Linear(C, K)`` on the class token, or on the mean of the patch tokens when the model
  has none (Swin, ``class_token=False``).
- Ψ^p (patch tokens): the tokens as a (C, h, w) map → 2 × [Conv3×3(C→C, no bias) → BatchNorm2d → ReLU] →
  global average pool → ``Linear(C, K)`` (the reference's "ResNet head").

The probes of one run of blocks with the same width and token grid (all of a ViT, one Swin stage) are stacked:
one grouped convolution / one batched matmul covers every block, instead of a Python loop over modules. The
in and out maps of a block share one batch of 2B samples, so in training mode the probe BatchNorm statistics
are taken over both (the looped reference does the same, which keeps the two implementations equal).

``LoopedProbes`` is the one-probe-at-a-time reference (used by the tests and the benchmark).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def probe_inputs(maps: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """Pair every block's input and output map into one batch.

    Args:
        maps: ``nb + 1`` residual-stream maps ``[B, T, C]``; block i reads ``maps[i]`` and writes ``maps[i + 1]``.
        prefix: number of prefix tokens (class/distillation/register) in front of the patch tokens.

    Returns:
        ``[2B, T, nb, C]``: rows ``:B`` are the block inputs, rows ``B:`` the block outputs.
    """
    s = torch.stack(maps, dim=2)  # [B, T, nb+1, C]
    return torch.cat([s[:, :, :-1], s[:, :, 1:]], 0)  # [2B, T, nb, C]


def _cls_feature(x: torch.Tensor, prefix: int, has_cls: bool) -> torch.Tensor:
    """[N, T, ..., C] -> [N, ..., C]: the class token, or the mean of the patch tokens."""
    return x[:, 0] if has_cls else x[:, prefix:].mean(1)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Under autocast the probe matmuls/convs pick their own dtype; otherwise run in the probes' dtype.
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


class BatchedProbes(nn.Module):
    """``nb`` probe pairs of width ``dim`` evaluated together (grouped conv + batched matmul).

    Args:
        nb: number of blocks.
        dim: residual width C of those blocks.
        num_classes: K.
        has_cls: whether the class probe reads token 0 (else the mean patch token).
        prefix: prefix tokens before the patch grid.
        grid: (h, w) of the patch tokens.
        channels_last: run the convolutions in channels-last layout (no extra copy: tokens already are).
    """

    def __init__(self, nb: int, dim: int, num_classes: int, has_cls: bool, prefix: int, grid: tuple[int, int],
                 channels_last: bool = True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.nb, self.dim, self.num_classes = nb, dim, num_classes
        self.has_cls, self.prefix, self.grid, self.channels_last = has_cls, prefix, tuple(grid), channels_last
        self.cls_w = nn.Parameter(torch.empty(nb, dim, num_classes, **kw))  # [nb, C, K] (Linear weight, transposed)
        self.cls_b = nn.Parameter(torch.empty(nb, num_classes, **kw))
        self.conv1 = nn.Parameter(torch.empty(nb * dim, dim, 3, 3, **kw))  # grouped: block i = rows i*C:(i+1)*C
        self.bn1 = nn.BatchNorm2d(nb * dim, **kw)
        self.conv2 = nn.Parameter(torch.empty(nb * dim, dim, 3, 3, **kw))
        self.bn2 = nn.BatchNorm2d(nb * dim, **kw)
        self.fc_w = nn.Parameter(torch.empty(nb, dim, num_classes, **kw))
        self.fc_b = nn.Parameter(torch.empty(nb, num_classes, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The per-module defaults of nn.Linear / nn.Conv2d: U(±1/sqrt(fan_in))."""
        b = 1 / math.sqrt(self.dim)
        for p in (self.cls_w, self.cls_b, self.fc_w, self.fc_b):
            nn.init.uniform_(p, -b, b)
        for p in (self.conv1, self.conv2):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if self.channels_last:  # weights (and so their grads / Adam state) in the layout the conv uses
                p.data = p.data.contiguous(memory_format=torch.channels_last)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Probe logits for every block's input and output map.

        Args:
            maps: ``nb + 1`` tensors ``[B, T, C]`` (detached residual-stream maps).

        Returns:
            (class-probe logits, patch-probe logits), each ``[2, B, nb, K]`` (index 0: block input, 1: output).
        """
        x = probe_inputs(maps, self.prefix)  # [2B, T, nb, C]
        x = _cast(x, self.cls_w.dtype)
        n2, _, nb, c = x.shape
        h, w = self.grid
        cls = torch.baddbmm(self.cls_b[:, None], _cls_feature(x, self.prefix, self.has_cls).transpose(0, 1),
                            self.cls_w)  # [nb, 2B, K]
        p = x[:, self.prefix:].reshape(n2, h, w, nb * c).permute(0, 3, 1, 2)  # [2B, nb*C, h, w], channels-last strides
        p = p.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        p = F.relu(self.bn1(F.conv2d(p, self.conv1, padding=1, groups=nb)))
        p = F.relu(self.bn2(F.conv2d(p, self.conv2, padding=1, groups=nb)))  # [2B, nb*C, h, w]
        p = p.mean((2, 3)).view(n2, nb, c).transpose(0, 1)  # [nb, 2B, C]
        patch = torch.baddbmm(self.fc_b[:, None], p, self.fc_w)  # [nb, 2B, K]
        k = self.num_classes
        return cls.transpose(0, 1).reshape(2, -1, nb, k), patch.transpose(0, 1).reshape(2, -1, nb, k)

    def to_looped(self) -> LoopedProbes:
        """The same probes as ``nb`` separate modules (copies of the weights and BatchNorm state)."""
        ref = LoopedProbes(self.nb, self.dim, self.num_classes, self.has_cls, self.prefix, self.grid,
                           device=self.cls_w.device, dtype=self.cls_w.dtype)
        c = self.dim
        with torch.no_grad():
            for i, head in enumerate(ref.heads):
                sl = slice(i * c, (i + 1) * c)
                head.cls.weight.copy_(self.cls_w[i].T)
                head.cls.bias.copy_(self.cls_b[i])
                head.fc.weight.copy_(self.fc_w[i].T)
                head.fc.bias.copy_(self.fc_b[i])
                head.patch[0].weight.copy_(self.conv1[sl])
                head.patch[3].weight.copy_(self.conv2[sl])
                for bn, src in ((head.patch[1], self.bn1), (head.patch[4], self.bn2)):
                    bn.weight.copy_(src.weight[sl])
                    bn.bias.copy_(src.bias[sl])
                    bn.running_mean.copy_(src.running_mean[sl])
                    bn.running_var.copy_(src.running_var[sl])
                    bn.num_batches_tracked.copy_(src.num_batches_tracked)
        return ref.train(self.training)

    def weight_decay_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(weights that take weight decay, biases and BatchNorm affine parameters that do not)."""
        return [self.cls_w, self.conv1, self.conv2, self.fc_w], [self.cls_b, self.fc_b, *self.bn1.parameters(),
                                                                   *self.bn2.parameters()]


class ProbeHead(nn.Module):
    """One block's probe pair as plain modules (the reference layout)."""

    def __init__(self, dim: int, num_classes: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.cls = nn.Linear(dim, num_classes, **kw)
        self.patch = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(dim, **kw), nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(dim, **kw), nn.ReLU(),
        )
        self.fc = nn.Linear(dim, num_classes, **kw)


class LoopedProbes(nn.Module):
    """One probe at a time: a Python loop over ``nb`` ProbeHeads. Same interface as BatchedProbes."""

    def __init__(self, nb: int, dim: int, num_classes: int, has_cls: bool, prefix: int, grid: tuple[int, int],
                 channels_last: bool = False, device=None, dtype=None):
        super().__init__()
        self.nb, self.dim, self.num_classes = nb, dim, num_classes
        self.has_cls, self.prefix, self.grid = has_cls, prefix, tuple(grid)
        self.heads = nn.ModuleList(ProbeHead(dim, num_classes, device=device, dtype=dtype) for _ in range(nb))

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """See ``BatchedProbes.forward``."""
        h, w = self.grid
        cls_out, patch_out = [], []
        for i, head in enumerate(self.heads):
            x = _cast(torch.cat([maps[i], maps[i + 1]]), head.cls.weight.dtype)  # [2B, T, C]
            cls_out.append(head.cls(_cls_feature(x, self.prefix, self.has_cls)))  # [2B, K]
            p = x[:, self.prefix:].transpose(1, 2).reshape(len(x), self.dim, h, w)  # [2B, C, h, w]
            patch_out.append(head.fc(head.patch(p).mean((2, 3))))  # [2B, K]
        k = self.num_classes
        return (torch.stack(cls_out, 1).view(2, -1, self.nb, k), torch.stack(patch_out, 1).view(2, -1, self.nb, k))

    def weight_decay_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        decay = [p for n, p in self.named_parameters() if p.dim() > 1]
        return decay, [p for n, p in self.named_parameters() if p.dim() <= 1]


def probe_ce(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample cross-entropy of probe logits, computed in float32.

    Args:
        logits: ``[2, B, nb, K]``.
        target: class indices ``[B]`` or soft targets ``[B, K]`` (mixup/cutmix: SoftTargetCrossEntropy).
        label_smoothing: applied to index targets.

    Returns:
        ``[2, B, nb]`` losses.
    """
    logp = torch.log_softmax(logits.float(), -1)  # [2, B, nb, K]
    k = logits.shape[-1]
    if target.dim() == 1:
        t = F.one_hot(target.long(), k).float()
        if label_smoothing:
            t = t * (1 - label_smoothing) + label_smoothing / k
    else:
        t = target.float()
    return -(logp * t[None, :, None]).sum(-1)


__all__ = ["BatchedProbes", "LoopedProbes", "ProbeHead", "probe_ce", "probe_inputs"]
