"""Data for the demo: scikit-learn's bundled 8x8 digits by default, or any tensor file / image folder.

Every data set comes out as flat float32 rows in [-1, 1] ([N, d], d = C*H*W) with a fixed-seed
train/test split; the image shape travels alongside so that grids can be drawn.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Dataset:
    """A train/test split of images flattened to rows, values in [-1, 1]."""

    name: str
    train: torch.Tensor  # [N_train, d] float32
    test: torch.Tensor  # [N_test, d] float32
    train_labels: torch.Tensor | None  # [N_train] int64, or None when the source has no labels
    test_labels: torch.Tensor | None
    image_shape: tuple[int, int, int]  # (C, H, W), prod = d

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    @property
    def n_classes(self) -> int:
        if self.train_labels is None:
            return 0
        return int(torch.cat([self.train_labels, self.test_labels]).max()) + 1

    def fingerprint(self) -> str:
        """A short hash of the split's contents: a cached checkpoint is reused only for the same data."""
        h = hashlib.sha256()
        for t in (self.train, self.test):
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


def _to_unit_range(x: np.ndarray, source: str) -> np.ndarray:
    """Map raw pixel values to [-1, 1]: 8-bit images by 0..255, values in [0, 1] or [-1, 1] as they are
    meant, anything else (other integer ranges included) by its global min and max."""
    if x.dtype == np.uint8:
        return (x.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"data from {source} has non-finite values (NaN or inf)")
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0.0 and hi <= 1.0:
        return (2.0 * x - 1.0).astype(np.float32)
    if lo >= -1.0 and hi <= 1.0:
        return x.astype(np.float32)
    if hi == lo:
        raise ValueError(f"data from {source} is constant ({lo}); nothing to learn")
    return (2.0 * (x - lo) / (hi - lo) - 1.0).astype(np.float32)


def _image_shape(x: np.ndarray, source: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Rows [N, ...] -> ([N, d], (C, H, W)). Accepts [N, H, W], [N, C, H, W], [N, H, W, C] (C in 1, 3, 4)
    and flat [N, d] with d a square number."""
    if x.ndim == 2:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"data from {source} is flat [N, {x.shape[1]}] and {x.shape[1]} is not a square; "
                             "give images as [N, H, W] or [N, C, H, W]")
        shape = (1, side, side)
    elif x.ndim == 3:
        shape = (1, x.shape[1], x.shape[2])
    elif x.ndim == 4:
        # Channels first when axis 1 is 1 or 3 (gray, RGB), else channels last when the last axis is 1, 3
        # or 4 (RGBA), else channels first with 4 channels.
        if x.shape[1] in (1, 3) or (x.shape[1] == 4 and x.shape[3] not in (1, 3, 4)):
            shape = tuple(x.shape[1:])
        elif x.shape[3] in (1, 3, 4):
            x = np.transpose(x, (0, 3, 1, 2))
            shape = tuple(x.shape[1:])
        else:
            raise ValueError(f"data from {source} has shape {x.shape}: no channel axis of size 1, 3 or 4")
    else:
        raise ValueError(f"data from {source} must have 2 to 4 dimensions [N, ...], got shape {x.shape}")
    if x.shape[0] < 10:
        raise ValueError(f"data from {source} has only {x.shape[0]} images; need at least 10")
    return np.ascontiguousarray(x.reshape(x.shape[0], -1)), shape


def _load_tensor_file(path: str):
    if path.endswith(".npy"):
        return np.load(path), None
    if path.endswith(".npz"):
        z = np.load(path)
        keys = list(z.keys())
        data_key = next((k for k in ("data", "images", "x", "X") if k in keys), keys[0])
        label_key = next((k for k in ("labels", "targets", "y") if k in keys), None)
        return z[data_key], (z[label_key] if label_key else None)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    labels = None
    if isinstance(obj, dict):
        data_key = next((k for k in ("data", "images", "x") if k in obj), None)
        if data_key is None:
            raise ValueError(f"--data {path}: a dict must hold the images under 'data', 'images' or 'x'; "
                             f"found keys {sorted(obj)}")
        labels = next((obj[k] for k in ("labels", "targets", "y") if k in obj), None)
        obj = obj[data_key]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"--data {path} must hold a tensor (or a dict with one), got {type(obj).__name__}")
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else labels
    return obj.numpy(), labels


def _load_image_folder(path: str):
    """All images below `path`; images in sub-folders get the sub-folder as their label (one class per folder)."""
    from PIL import Image

    files = []
    for root, _dirs, names in os.walk(path):
        files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_SUFFIXES)]
    files.sort()
    if not files:
        raise ValueError(f"--data {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    first = Image.open(files[0])
    mode = "L" if first.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
    images = []
    for f in files:
        img = Image.open(f).convert(mode)
        if img.size != first.size:
            raise ValueError(f"--data {path}: {f} is {img.size}, but {files[0]} is {first.size}; all images "
                             "must have one size")
        images.append(np.asarray(img, dtype=np.uint8))
    x = np.stack(images)  # [N, H, W] or [N, H, W, 3]
    classes = sorted({os.path.relpath(os.path.dirname(f), path) for f in files})
    labels = None
    if len(classes) > 1:
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[os.path.relpath(os.path.dirname(f), path)] for f in files])
    return x, labels


def load_dataset(path: str | None = None, *, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The scikit-learn digits (path=None) or the images in `path` (.pt/.pth/.npy/.npz tensor file or an
    image folder), scaled to [-1, 1] and split at random (fixed `seed`) into train and test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        raw, labels, name = digits.images.astype(np.float32) / 16.0, digits.target, "sklearn digits (8x8)"
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data {path}: no such file or folder")
        if os.path.isdir(path):
            raw, labels = _load_image_folder(path)
        elif path.endswith((".pt", ".pth", ".npy", ".npz")):
            raw, labels = _load_tensor_file(path)
        else:
            raise ValueError(f"--data {path}: expected a .pt/.pth/.npy/.npz tensor file or an image folder")
        name = os.path.basename(os.path.normpath(path))
    flat, shape = _image_shape(np.asarray(raw), path or "sklearn digits")
    flat = _to_unit_range(flat, path or "sklearn digits")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        if labels.shape[0] != flat.shape[0]:
            raise ValueError(f"--data {path}: {labels.shape[0]} labels for {flat.shape[0]} images")
        if labels.min() < 0:
            raise ValueError(f"--data {path}: labels must be >= 0")
    n = flat.shape[0]
    n_test = max(1, int(round(test_fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    x = torch.from_numpy(flat)
    y = torch.from_numpy(labels) if labels is not None else None
    return Dataset(
        name=name,
        train=x[train_idx].contiguous(),
        test=x[test_idx].contiguous(),
        train_labels=None if y is None else y[train_idx].contiguous(),
        test_labels=None if y is None else y[test_idx].contiguous(),
        image_shape=tuple(int(s) for s in shape),
    )
