"""Save / load pruned models: safetensors weights + a JSON architecture file. Nothing is pickled."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from torch import nn

from .arch import Adapter, adapter_class, adapter_for
from .errors import CheckpointError, UnsupportedModelError
from .files import apply_umask
from .version import __version__

FORMAT = "vitprune_fast.pruned/1"
WEIGHTS = "model.safetensors"
ARCH_FILE = "architecture.json"
NATIVE_DIR = "native"  # where a library's own format of the model goes (transformers: save_pretrained)


def _model_name(model: nn.Module, model_name: str | None) -> str:
    if model_name:
        return model_name
    name = adapter_for(model).model_name()
    if not name:
        raise CheckpointError("cannot tell the timm model name; pass save_pruned(..., model_name='deit_small_...')")
    return name


def stock_model(model: nn.Module, model_name: str | None = None) -> dict:
    """How to rebuild ``model`` as a stock timm model: its widths in ``create_model`` kwargs, and the registered
    timm model of exactly that shape when there is one.

    Returns:
        ``{"model_name", "kwargs", "registered"}`` (``registered``: a timm name whose defaults build exactly this
        architecture, or None), or ``{"reason"}`` when no stock timm model has these shapes. The recipe is checked by
        building it on the meta device: same tensors and shapes, same per-block layout.
    """
    adapter = adapter_for(model)
    try:
        kwargs = adapter.stock_kwargs()
    except UnsupportedModelError as e:
        return {"reason": str(e)}
    name = _model_name(model, model_name)
    mine = _shapes(model)
    try:
        built = _meta_model(name, kwargs)
    except CheckpointError as e:
        return {"reason": str(e)}
    if _shapes(built) != mine or adapter_for(built).extra_state() != adapter.extra_state():
        return {"reason": f"timm.create_model({name!r}, **kwargs) does not rebuild these tensors / block layout"}
    return {"model_name": name, "kwargs": kwargs, "registered": _registered_match(name, mine, kwargs)}


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_model(name: str, kwargs: dict) -> nn.Module:
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # timm raises many types for bad names/kwargs
        raise CheckpointError(f"cannot build timm model {name!r} with {kwargs}: {type(e).__name__}: {e}") from e


@functools.lru_cache(maxsize=4096)
def _registered_recipe(name: str) -> tuple[str, str] | None:
    """(stock kwargs as JSON, shapes as JSON) of a registered timm model with its defaults; None if unbuildable."""
    try:
        built = _meta_model(name, {})
        return json.dumps(adapter_for(built).stock_kwargs(), sort_keys=True), json.dumps(sorted(_shapes(built).items()))
    except (CheckpointError, UnsupportedModelError):
        return None


def _registered_match(name: str, shapes: dict, kwargs: dict) -> str | None:
    """A registered timm model (same family prefix, e.g. ``deit_*``) whose defaults build exactly this model."""
    import timm

    family = name.split("_")[0]
    want = (json.dumps(kwargs, sort_keys=True), json.dumps(sorted(shapes.items())))
    cfg_size = list(kwargs.get("img_size") or [])
    for cand in timm.list_models(f"{family}_*"):
        cfg = timm.models.get_pretrained_cfg(cand)  # cheap filter before building anything
        if cfg is not None and (cfg.num_classes != kwargs.get("num_classes") or
                                list(cfg.input_size[1:]) != [int(v) for v in cfg_size]):
            continue
        if _registered_recipe(cand) == want:
            return cand
    return None


def stock_call(stock: dict, weights: str | os.PathLike) -> str:
    """The ``timm.create_model`` call that loads ``weights`` into the stock model ``stock`` (from
    :func:`stock_model`), with only the kwargs that differ from the named model's defaults."""
    if "reason" in stock:
        return f"not a stock timm shape ({stock['reason']})"
    if stock["registered"]:
        return f"timm.create_model({stock['registered']!r}, checkpoint_path={str(weights)!r})"
    defaults = _registered_recipe(stock["model_name"])
    base = json.loads(defaults[0]) if defaults else {}
    args = ", ".join(f"{k}={v!r}" for k, v in stock["kwargs"].items() if base.get(k) != v)
    return f"timm.create_model({stock['model_name']!r}, {args}, checkpoint_path={str(weights)!r})"


def _architecture(model: nn.Module, model_name: str | None, model_kwargs: dict | None) -> dict:
    adapter = adapter_for(model)
    space = adapter.describe()
    kwargs = adapter.build_recipe()
    kwargs.update(model_kwargs or {})
    return {
        "format": FORMAT,
        "library_version": __version__,
        "timm_version": __import__("timm").__version__,
        "arch": adapter.arch,
        "model_name": _model_name(model, model_name),
        "model_kwargs": kwargs,
        "groups": {n: {"kind": g.kind, "size": g.size, **({"num_heads": g.num_heads} if g.kind == "attn" else {})}
                   for n, g in space.groups.items()},
        "tensors": {k: list(v.shape) for k, v in model.state_dict().items()},
        "extra": adapter.extra_state(),
        "timm_stock": stock_model(model, model_name),
    }


def _build(arch: dict, device: str | torch.device = "meta") -> nn.Module:
    """Build the model from the recipe (its adapter's :meth:`~vitprune_fast.arch.Adapter.build_model`: timm's
    create_model, a transformers class from its config) and resize every tensor to the saved shapes (no data)."""
    try:
        builder = adapter_class(arch.get("arch", "vit"))
    except UnsupportedModelError:  # an adapter not registered now: its model is a timm one, as before adapters built
        builder = Adapter
    try:
        with torch.device(device):
            model = builder.build_model(arch["model_name"], arch["model_kwargs"])
    except Exception as e:  # the libraries raise many types for bad names/kwargs
        raise CheckpointError(f"cannot build model {arch['model_name']!r} with {arch['model_kwargs']}: {e}") from e
    adapter = adapter_for(model)
    space = adapter.describe()
    for name, g in arch["groups"].items():
        if name not in space.groups or space.groups[name].kind != g["kind"]:
            raise CheckpointError(f"architecture.json group {name!r} does not exist in the rebuilt model")
        if g["kind"] == "attn":
            adapter.set_heads(space.groups[name], int(g["num_heads"]))
    sd_names = set(model.state_dict())
    saved = arch["tensors"]
    if sd_names != set(saved):
        diff = sorted(sd_names ^ set(saved))[:5]
        raise CheckpointError(f"rebuilt model's tensors differ from the saved ones (e.g. {diff})")
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in saved and list(t.shape) != saved[name]:
                t.set_(torch.empty(saved[name], dtype=t.dtype, device=t.device))
    adapter.sync_attributes()
    try:
        adapter.apply_extra_state(arch.get("extra", {}))
    except (AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(f"architecture.json 'extra' does not fit the rebuilt model: {e}") from e
    return model


def _layout(model: nn.Module) -> dict[str, tuple]:
    """What a recipe must rebuild beyond tensor shapes: every module's class and the settings that change its
    function (norm eps, GELU's approximation); dropout-like and identity modules are left out (training-only)."""
    out = {}
    for name, m in model.named_modules():
        kind = type(m).__name__
        if isinstance(m, nn.Identity) or "Drop" in kind:
            continue
        out[name] = (kind, getattr(m, "eps", None), getattr(m, "approximate", None))
    return out


def _check_layout(model: nn.Module, rebuilt: nn.Module, arch: dict) -> None:
    mine, theirs = _layout(model), _layout(rebuilt)
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            raise CheckpointError(
                f"timm.create_model({arch['model_name']!r}, **{arch['model_kwargs']}) does not rebuild this model: "
                f"module {name or '<root>'!r} is {mine.get(name)} here, {theirs.get(name)} rebuilt (class, eps, "
                "approximation); pass the model_name / model_kwargs that built it")


def _meta_safe(model: nn.Module) -> bool:
    """Building on meta is safe when every non-persistent buffer can be re-initialised afterwards: by its module
    (timm's ``init_non_persistent_buffers``) or by the adapter (:meth:`~vitprune_fast.arch.Adapter.init_buffers`)."""
    adapter = adapter_for(model)
    return all(hasattr(m, "init_non_persistent_buffers") or adapter.inits_buffers_of(m)
               or not m._non_persistent_buffers_set for m in model.modules())


def save_pruned(model: nn.Module, directory: str | os.PathLike, model_name: str | None = None,
                model_kwargs: dict | None = None) -> Path:
    """Save a (pruned) timm model as ``model.safetensors`` + ``architecture.json``.

    The architecture file holds the timm model name, structural create_model kwargs, every group's size and
    head count, and every tensor's shape. Saving checks that the model can be rebuilt from it.

    Args:
        model: a timm VisionTransformer / SwinTransformer, pruned or not.
        directory: created if missing.
        model_name: timm model name (default: ``model.pretrained_cfg['architecture']``).
        model_kwargs: extra create_model kwargs overriding the inferred ones.

    Returns:
        The directory path.
    """
    from safetensors.torch import save_file

    arch = _architecture(model, model_name, model_kwargs)
    # fail at save time rather than at load time: names and shapes (_build), classes and norm settings (layout)
    _check_layout(model, _build(arch), arch)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": FORMAT})
    apply_umask(directory / WEIGHTS)  # safetensors writes 0600
    native = adapter_for(model).save_native(directory / NATIVE_DIR)
    if native is not None:  # the library's own format (transformers' save_pretrained), or why it cannot hold it
        arch["native"] = native
    (directory / ARCH_FILE).write_text(json.dumps(arch, indent=1))
    return directory


def load_pruned(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by :func:`save_pruned`: a stock timm model at the pruned shapes, in eval mode.

    The model is built on the meta device, resized to the saved shapes, materialised on ``device`` and
    filled from the safetensors file.

    Raises:
        CheckpointError: missing, corrupt or mismatched files.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    arch_path, w_path = directory / ARCH_FILE, directory / WEIGHTS
    for p in (arch_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{p} does not exist (expected a directory written by save_pruned)")
    try:
        arch = json.loads(arch_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{arch_path} is not valid JSON: {e}") from e
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise CheckpointError(f"{arch_path} is not a vitprune_fast architecture file (format {FORMAT})")
    for key in ("model_name", "model_kwargs", "groups", "tensors"):
        if key not in arch:
            raise CheckpointError(f"{arch_path} lacks {key!r}")
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path} is corrupt or not a safetensors file: {e}") from e
    for k, v in state.items():
        want = arch["tensors"].get(k)
        if want is not None and list(v.shape) != want:
            raise CheckpointError(f"{w_path}: tensor {k} has shape {list(v.shape)}, architecture says {want}")
    model = _build(arch)
    if not _meta_safe(model):  # e.g. an older timm without init_non_persistent_buffers
        model = _build(arch, "cpu")
    missing = sorted(set(model.state_dict()) - set(state))
    extra = sorted(set(state) - set(model.state_dict()))
    if missing or extra:
        raise CheckpointError(f"{w_path} does not match {arch_path}: missing {missing[:5]}, unexpected {extra[:5]}")
    # the floating dtype of the weights (integer buffers such as BatchNorm's num_batches_tracked keep theirs)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    if next(iter(model.state_dict().values())).is_meta:
        model = model.to_empty(device=device)
    model = model.to(device=device, dtype=dtype)
    for m in model.modules():  # non-persistent buffers (Swin relative_position_index) are not in the file
        if hasattr(m, "init_non_persistent_buffers"):
            m.init_non_persistent_buffers()
    adapter_for(model).init_buffers()
    model.load_state_dict(state, strict=True)
    return model.eval()
