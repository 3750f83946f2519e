"""Data: the embedded ``digits`` set (scikit-learn, no download) and torchvision ImageFolders with timm transforms.

``digits`` is scikit-learn's ``load_digits``: 1797 real 8×8 handwritten digits (grey levels 0..16) that ship inside
the scikit-learn wheel. They are upsampled to 32×32 (bilinear), repeated to 3 channels, and normalised with the
training split's mean and std. The split is stratified and fixed (seed 0), so every run sees the same images.

Proxy and calibration images (UP-ViTs' scoring set, reconstruction's calibration set) are a seeded draw from the
training split through the *evaluation* transform (:meth:`DataBundle.proxy`): plain training images, as the UP-ViTs
paper scores on, not augmented ones whose scores would change with the augmentation draw.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import ConfigError
from .seeding import seed_worker

DIGITS = "digits"
DIGITS_SIZE = 32
DIGITS_CLASSES = 10


@dataclass
class DataBundle:
    """Train and test sets of one data source.

    Attributes:
        train: training dataset (``(image, label)`` items), with the training transform (augmentation).
        test: evaluation dataset.
        num_classes: number of labels.
        name: ``digits`` or the ImageFolder path.
        train_eval: the training split through the evaluation transform (no augmentation); default ``train`` (the
            digits tensors are not augmented).
    """

    train: Dataset
    test: Dataset
    num_classes: int
    name: str
    train_eval: Dataset | None = None

    def proxy(self, n: int, seed: int = 0, exclude: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` training images through the evaluation transform, drawn without replacement by ``seed`` (none of the
        positions in ``exclude``: e.g. a calibration set apart from the proxy images).

        Returns:
            ``(images [n, C, H, W], labels [n], indices [n])``: ``indices`` are the drawn positions in the training
            split, in draw order.

        Raises:
            ConfigError: ``n`` < 1 or more than the training split holds.
        """
        source = self.train_eval if self.train_eval is not None else self.train
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
        if exclude is not None:
            order = order[~torch.isin(order, torch.as_tensor(exclude))]
        if not 1 <= n <= len(order):
            raise ConfigError(f"cannot draw {n} images from the {len(order)} of the training split left to draw")
        idx = order[:n]
        items = [source[int(i)] for i in idx]
        return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items]), idx

    def loaders(self, batch_size: int = 64, shuffle_train: bool = True, seed: int = 0,
                num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
        """(train loader, test loader); the train loader shuffles with a generator seeded by ``seed``, and workers
        seed their Python ``random`` and numpy from it (:func:`vitprune_fast.seeding.seed_worker`), so the batches and
        their augmentation repeat for a seed.

        Under torch.distributed the train loader gives every rank its own shard through a seeded
        DistributedSampler (``batch_size`` per rank; the training loops call its ``set_epoch``); the test loader
        is the whole set on every rank (:func:`vitprune_fast.finetune.evaluate` shards it by batch).
        """
        from .distributed import dist_info

        rank, world = dist_info()
        g = torch.Generator().manual_seed(seed)
        if world > 1:
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(self.train, world, rank, shuffle=shuffle_train, seed=seed)
            train = DataLoader(self.train, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                               worker_init_fn=seed_worker, generator=g)
        else:
            train = DataLoader(self.train, batch_size=batch_size, shuffle=shuffle_train, generator=g,
                               num_workers=num_workers, drop_last=False, worker_init_fn=seed_worker)
        test = DataLoader(self.test, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed))
        return train, test


def require_sklearn() -> None:
    """Raise a clear ImportError when scikit-learn (the source of ``digits``) is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ImportError("the embedded 'digits' data needs scikit-learn: pip install 'vitprune_fast[demo]' (or "
                          "scikit-learn)") from e


def digits_tensors(size: int = DIGITS_SIZE, test_fraction: float = 0.25, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as normalised image tensors.

    Args:
        size: output side length (bilinear upsampling from 8).
        test_fraction: fraction of the 1797 images held out (stratified by label).
        seed: split seed.

    Returns:
        ``(x_train [N, 3, size, size] float32, y_train [N] int64, x_test, y_test)``.
    """
    require_sklearn()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed,
                                           stratify=d.target)
    x = F.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)  # [N, 1, size, size]
    x = x.expand(-1, 3, -1, -1)  # [N, 3, size, size]: timm models expect RGB
    xtr, xte = x[idx_train], x[idx_test]
    mean, std = xtr.mean(), xtr.std()  # scalar stats: the three channels are identical
    return (xtr - mean) / std, y[idx_train], (xte - mean) / std, y[idx_test]


def digits(size: int = DIGITS_SIZE, test_fraction: float = 0.25, seed: int = 0) -> DataBundle:
    """The embedded digits as TensorDatasets (see :func:`digits_tensors`)."""
    xtr, ytr, xte, yte = digits_tensors(size, test_fraction, seed)
    return DataBundle(TensorDataset(xtr, ytr), TensorDataset(xte, yte), DIGITS_CLASSES, DIGITS)


def _timm_transform(model: nn.Module, training: bool):
    from timm.data import create_transform, resolve_data_config

    from .metrics import input_size

    cfg = resolve_data_config({}, model=model)
    cfg["input_size"] = input_size(model)  # a model built with img_size=... keeps the default pretrained_cfg size
    return create_transform(**cfg, is_training=training)


def image_folder(path: str | os.PathLike, model: nn.Module) -> DataBundle:
    """A torchvision ImageFolder with timm's train / eval transforms for ``model``.

    ``path/train`` and ``path/val`` (or ``path/test``) are used when both exist; otherwise the folder itself
    serves as both sets (e.g. evaluating a validation folder).

    Raises:
        FileNotFoundError: the path does not exist or holds no class folders with images.
    """
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data path {str(root)!r} is not a directory (use an ImageFolder or 'digits')")
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train_dir = root / "train"
    else:
        train_dir = test_dir = root
    try:
        train = ImageFolder(str(train_dir), transform=_timm_transform(model, True))
        test = ImageFolder(str(test_dir), transform=_timm_transform(model, False))
        train_eval = ImageFolder(str(train_dir), transform=_timm_transform(model, False))
    except (FileNotFoundError, RuntimeError) as e:  # torchvision: no class folders / no valid images
        raise FileNotFoundError(f"{root}: not a usable ImageFolder ({e})") from e
    return DataBundle(train, test, len(train.classes), str(root), train_eval)


def load_data(spec: str, model: nn.Module | None = None) -> DataBundle:
    """``digits`` or an ImageFolder path (needs ``model`` for its input size and normalisation)."""
    if spec == DIGITS:
        return digits()
    if model is None:
        raise ConfigError("an ImageFolder needs the model to resolve its transforms")
    return image_folder(spec, model)


def take_images(loader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images and labels a loader yields, concatenated."""
    xs, ys, have = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        have += len(x)
        if have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def random_affine(x: torch.Tensor, generator: torch.Generator | None = None, degrees: float = 5.0,
                  scale: float = 0.05, shift: float = 0.05) -> torch.Tensor:
    """Per-image random rotation / scale / shift of a batch (cheap augmentation for the in-memory digits).

    Args:
        x: images [B, C, H, W].
        generator: random source.
        degrees: max |rotation|.
        scale: max relative zoom in or out.
        shift: max |shift| as a fraction of the image side.

    Returns:
        Augmented images [B, C, H, W] (borders replicated: the digits' background).
    """
    n = x.shape[0]

    def u(*shape):  # uniform in [-1, 1]
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle = u(n) * math.radians(degrees)
    s = 1 + u(n) * scale
    t = u(n, 2) * 2 * shift  # affine_grid coordinates span [-1, 1]: a fraction f of the side is 2f
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)  # [B, H, W, 2]
    return F.grid_sample(x, grid.to(x.device), padding_mode="border", align_corners=False)
