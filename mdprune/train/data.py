"""Data: ImageFolder directories, and the built-in default data set (Fashion-MNIST, read offline).

Fashion-MNIST is read from the files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``; ``make demo`` installs it where apt is available).
Where it is missing, the built-in data set falls back to scikit-learn's 8x8 digits (shipped inside the
scikit-learn wheel, upscaled to 28x28), and says so. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

FASHION_DIRS = [Path(os.environ.get("MDPRUNE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))]
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class DataError(ValueError):
    """Missing, empty or malformed data."""


@dataclass
class DataSpec:
    """What a data set looks like to a model."""

    name: str
    num_classes: int
    channels: int
    size: int  # images are size x size


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir() -> Path | None:
    for d in FASHION_DIRS:
        if (d / "train-images-idx3-ubyte.gz").exists():
            return d
    return None


def _normalise(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - mean) / std


def fashion_mnist(train: bool) -> TensorDataset:
    """Fashion-MNIST (60k train / 10k test, 1x28x28, normalised) from the Debian package's files."""
    d = fashion_mnist_dir()
    if d is None:
        raise DataError("Fashion-MNIST not found: install the Debian package dataset-fashion-mnist "
                        "(apt-get install dataset-fashion-mnist) or set MDPRUNE_FASHION_MNIST")
    prefix = "train" if train else "t10k"
    x = _read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    y = _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz")
    return TensorDataset(_normalise(x, FASHION_MEAN, FASHION_STD), torch.from_numpy(y.astype(np.int64)))


def digits(train: bool, size: int = 28) -> TensorDataset:
    """scikit-learn's digits (1797 8x8 images, 10 classes), upscaled to ``size``: 80% train, 20% test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("neither Fashion-MNIST (apt-get install dataset-fashion-mnist) nor scikit-learn "
                        "(pip install scikit-learn) is available for the built-in data set") from e
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(d.target.astype(np.int64))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    cut = int(0.8 * len(y))
    idx = order[:cut] if train else order[cut:]
    return TensorDataset(x[idx], y[idx])


def builtin(train: bool, limit: int | None = None, seed: int = 0) -> tuple[Dataset, DataSpec]:
    """The default data set: Fashion-MNIST if installed, else digits. ``limit`` keeps a fixed random subset."""
    if fashion_mnist_dir() is not None:
        ds, spec = fashion_mnist(train), DataSpec("fashion-mnist", 10, 1, 28)
    else:
        ds, spec = digits(train), DataSpec("digits", 10, 1, 28)
    if limit is not None and limit < len(ds):
        g = torch.Generator().manual_seed(seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[:limit].tolist())
    return ds, spec


def image_folder(root: str | Path, split: str, size: int, train: bool) -> tuple[Dataset, DataSpec]:
    """An ImageFolder split (``root/train``, ``root/val``) with the usual ImageNet-style transforms."""
    from torchvision import datasets, transforms

    path = Path(root) / split
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist (expected {root}/train and {root}/val, "
                        "one sub-folder per class)")
    classes = [c for c in path.iterdir() if c.is_dir()]
    if not classes:
        raise DataError(f"data folder {path} has no class sub-folders")
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if train:
        tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), norm])
    else:
        tf = transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size),
                                 transforms.ToTensor(), norm])
    try:
        ds = datasets.ImageFolder(str(path), transform=tf, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"data folder {path}: {e}") from e
    if len(ds.classes) < 2:
        raise DataError(f"data folder {path} has {len(ds.classes)} class: pruning needs a loss over at least two "
                        "classes (one class gives zero gradients, so every element would score zero)")
    if len(ds.samples) <= HEADER_CHECK_LIMIT:
        unreadable = [p for p, _ in ds.samples if not _readable_header(p)]
        if unreadable:
            raise DataError(f"{len(unreadable)} file(s) in {path} are not readable images, first {unreadable[0]}: "
                            "remove or replace them")
    return ds, DataSpec(str(root), len(ds.classes), 3, size)


HEADER_CHECK_LIMIT = 50_000  # image headers checked up front below this many files; above, on first read


def read_image(path: str):  # noqa: ANN201 - a PIL image
    """Open an image as RGB; a file PIL cannot decode is a :class:`DataError` that names it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({e}): remove or replace it") from e


def _readable_header(path: str) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - parsing the header is the check
        return True
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def image_folder_classes(root: str | Path, split: str = "train") -> int:
    """How many classes an ImageFolder split has (its sub-folders), without reading any image."""
    path = Path(root) / split
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist (expected {root}/train and {root}/val, "
                        "one sub-folder per class)")
    return sum(1 for c in path.iterdir() if c.is_dir())


def loader(ds: Dataset, batch_size: int, train: bool, workers: int = 0, seed: int = 0,
           distributed: bool = False) -> DataLoader:
    """A DataLoader; under DDP each process reads its own shard (DistributedSampler). Batches are pinned in
    host memory when CUDA is available, so the ``non_blocking`` copies of the training loop overlap compute."""
    sampler = DistributedSampler(ds, shuffle=train, seed=seed) if distributed else None
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, drop_last=train, generator=g, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available())
