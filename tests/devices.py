"""Where tests that ask for the Triton kernels explicitly run them.

On a CUDA machine: the GPU (conftest leaves TRITON_INTERPRET unset there, so CPU tensors cannot run Triton). Without
CUDA: the CPU, through the Triton interpreter that conftest switches on.
"""
import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
