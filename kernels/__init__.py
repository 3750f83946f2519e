"""Triton kernels (installed as ``vitprune_fast.kernels``). One file per op: kernel, launcher, ``<op>_ref``."""
