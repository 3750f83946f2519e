"""KL(q‖p) summed over images, per candidate: the UP-ViTs importance of one removed channel."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_sum_ref(teacher_logits: torch.Tensor, student_logits: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """Σ_images Σ_classes softmax(t)·(log_softmax(t) − log_softmax(s)) for each of K stacked candidates.

    Args:
        teacher_logits: [n, C].
        student_logits: [K·n, C], candidate-major (rows k·n .. k·n+n-1 belong to candidate k).
        num_candidates: K.

    Returns:
        [K] sums in float64 when the inputs are float64, else float32.
    """
    acc = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    t = F.log_softmax(teacher_logits.to(acc), -1)  # [n, C]
    s = F.log_softmax(student_logits.to(acc), -1).view(num_candidates, *t.shape)  # [K, n, C]
    return (t.exp() * (t - s)).sum((1, 2))


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, num_candidates: int,
           use_kernel: bool = False) -> torch.Tensor:
    """The fused Triton kernel when ``use_kernel`` (CUDA, or CPU under TRITON_INTERPRET=1); else plain torch."""
    if use_kernel:
        from ..kernels.kl_div import kl_per_candidate

        return kl_per_candidate(teacher_logits, student_logits, num_candidates)
    return kl_sum_ref(teacher_logits, student_logits, num_candidates)
