"""Regenerate the trained digits fixtures of tests/test_screened.py: the demo's DeiT and Swin after 300 training
steps of the demo's recipe (seed 0), trained on ONE thread and saved with ``save_pruned``.

Training is deterministic for a given thread count and CPU, but another thread count or CPU sums in another order
and, over 300 steps, ends at another model; the screen-accuracy bounds are measured on these files, so the tests
load them instead of training.

    python tests/data/make_digits_fixtures.py
"""
from pathlib import Path

import torch

from vitprune_fast.data import digits
from vitprune_fast.demo import MODELS, DemoConfig, base_model
from vitprune_fast.io import save_pruned

STEPS = 300
HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    torch.set_num_threads(1)
    data = digits()
    for key in ("deit", "swin"):
        model, _, _ = base_model(key, DemoConfig(train_steps=STEPS), data.train, None, lambda *a: None)
        print("wrote", save_pruned(model, HERE / f"digits-{key}-{STEPS}", model_name=MODELS[key][0]))
