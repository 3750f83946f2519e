"""Checking a saved DAP state (``DAP.load_state_dict``): every problem found before anything is loaded."""
from __future__ import annotations

import torch

#: Layout version of :meth:`DAP.state_dict`, and its keys.
STATE_VERSION = 1
STATE_KEYS = ("version", "config", "model", "t", "gates_on", "gate", "keep", "units", "goal", "ema", "dpsi_cls",
              "dpsi_patch", "bpi_n", "taylor", "taylor_n", "history", "probes", "probe_optimizer")


def contiguous(obj):
    """A copy of nested dicts/lists/tuples with every tensor detached and contiguous (safetensors-ready)."""
    if torch.is_tensor(obj):
        return obj.detach().contiguous()
    if isinstance(obj, dict):
        return {k: contiguous(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(contiguous(v) for v in obj)
    return obj


def signature_diff(saved, mine: dict) -> str:
    """Where a saved model signature differs from this model's (first difference)."""
    head = "the state was saved for a different model: "
    if not isinstance(saved, dict):
        return head + f"its model entry is a {type(saved).__name__}, not a dict"
    sb, mb = saved.get("blocks"), mine["blocks"]
    if not isinstance(sb, list) or len(sb) != len(mb):
        return head + f"{len(sb) if isinstance(sb, list) else sb!r} DAP blocks saved, this model has {len(mb)}"
    for i, (a, b) in enumerate(zip(sb, mb, strict=True)):
        if a != b:
            return head + f"block {i} is {a} in the state, {b} here ([name, kind, units, params/unit, heads, head_dim])"
    for k, v in mine.items():
        if saved.get(k) != v:
            return head + f"{k}: saved {saved.get(k)!r}, this model {v!r}"
    return head + f"unknown entries {sorted(set(saved) - set(mine))}"


def tensor_problems(name: str, v, shape: tuple[int, ...], kind: str) -> list[str]:
    """[] if ``v`` is a tensor of ``shape`` and kind ``float`` | ``int`` | ``bool``, else why not."""
    if not torch.is_tensor(v):
        return [f"{name}: expected a tensor, got {type(v).__name__}"]
    if tuple(v.shape) != tuple(shape):
        return [f"{name}: shape {tuple(v.shape)}, expected {tuple(shape)}"]
    got = "bool" if v.dtype == torch.bool else "float" if v.is_floating_point() else "complex" if v.is_complex() \
        else "int"
    return [] if got == kind else [f"{name}: dtype {v.dtype}, expected a {kind} tensor"]


def module_state_problems(name: str, saved, mine: dict[str, torch.Tensor]) -> list[str]:
    """Keys, shapes and kinds of a saved module state dict against the live one."""
    if not isinstance(saved, dict):
        return [f"{name}: expected a state dict, got {type(saved).__name__}"]
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or extra:
        return [f"{name}: missing keys {missing}, unexpected keys {extra}"]
    problems = []
    for k, v in mine.items():
        kind = "bool" if v.dtype == torch.bool else "float" if v.is_floating_point() else "int"
        problems += tensor_problems(f"{name}.{k}", saved[k], tuple(v.shape), kind)
    return problems


def optimizer_state_problems(saved, opt: torch.optim.Optimizer) -> list[str]:
    """Groups, parameter counts and state tensor shapes of a saved optimizer state dict against ``opt``."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        return ["probe_optimizer: expected an optimizer state dict (state, param_groups)"]
    groups = saved["param_groups"]
    sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None for g in groups]
    mine = [len(g["params"]) for g in opt.param_groups]
    if sizes != mine:
        return [f"probe_optimizer: parameter groups of sizes {sizes}, expected {mine}"]
    params = dict(zip((i for g in groups for i in g["params"]), (p for g in opt.param_groups for p in g["params"]),
                      strict=True))
    problems = []
    for i, st in saved["state"].items():
        if i not in params or not isinstance(st, dict):
            problems.append(f"probe_optimizer: state for unknown parameter {i!r}")
            continue
        p = params[i]
        for k, v in st.items():
            if k == "step":
                if not (isinstance(v, int | float) or torch.is_tensor(v) and v.numel() == 1):
                    problems.append(f"probe_optimizer.state[{i}].step: expected a number, got {v!r}")
            else:
                problems += tensor_problems(f"probe_optimizer.state[{i}].{k}", v, tuple(p.shape), "float")
    return problems
