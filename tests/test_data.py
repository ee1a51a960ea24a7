"""Data loading: the shipped MNIST and digits sets, image folders, user factories, and the
seeded, disjoint train / holdout / test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from host.data import (
    DataSplits,
    load_dataset,
    load_image_folder,
    load_mnist_5k,
    split_indices,
)


@pytest.fixture(scope="module")
def mnist_splits() -> DataSplits:
    return load_dataset("mnist_5k", seed=0)


def test_mnist_5k_loader_shapes_labels_range() -> None:
    data = load_mnist_5k()
    assert data.images.shape == (5000, 1, 28, 28)
    assert data.images.dtype == torch.float32
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    assert data.labels.dtype == torch.int64
    assert torch.bincount(data.labels).tolist() == [500] * 10
    # Real digits: a centred stroke, empty corners.
    assert data.images[:, :, 12:16, 12:16].mean() > 5 * data.images[:, :, :4, :4].mean()


def test_mnist_default_split_sizes_and_normalisation(mnist_splits: DataSplits) -> None:
    assert mnist_splits.sizes() == (3500, 500, 1000)
    assert mnist_splits.input_shape == (1, 28, 28)
    assert mnist_splits.num_classes == 10
    train_images = mnist_splits.train.tensors[0]  # type: ignore[attr-defined]
    assert abs(float(train_images.mean())) < 1e-3
    assert abs(float(train_images.std()) - 1.0) < 1e-3
    # Stratified: every class equally represented in holdout and test.
    assert torch.bincount(mnist_splits.holdout.tensors[1]).tolist() == [50] * 10  # type: ignore[attr-defined]
    assert torch.bincount(mnist_splits.test.tensors[1]).tolist() == [100] * 10  # type: ignore[attr-defined]
    image, label = mnist_splits.train[0]
    assert image.shape == (1, 28, 28) and label.dtype == torch.int64


def test_splits_disjoint_and_deterministic() -> None:
    labels = np.repeat(np.arange(10), 500)
    train, holdout, test = split_indices(labels, seed=0)
    assert (len(train), len(holdout), len(test)) == (3500, 500, 1000)
    assert not set(train) & set(holdout) and not set(train) & set(test)
    assert not set(holdout) & set(test)
    assert len(set(train) | set(holdout) | set(test)) == 5000
    again = split_indices(labels, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, holdout, test), again, strict=True))
    other = split_indices(labels, seed=1)
    assert not np.array_equal(test, other[2])


def test_load_dataset_deterministic(mnist_splits: DataSplits) -> None:
    again = load_dataset("mnist", seed=0)  # alias of mnist_5k
    for a, b in [(mnist_splits.holdout, again.holdout), (mnist_splits.test, again.test)]:
        assert torch.equal(a.tensors[0], b.tensors[0])  # type: ignore[attr-defined]
        assert torch.equal(a.tensors[1], b.tensors[1])  # type: ignore[attr-defined]


def test_sklearn_digits_upsampled() -> None:
    splits = load_dataset("digits", image_size=16, holdout_fraction=0.1, test_fraction=0.2)
    assert splits.input_shape == (1, 16, 16)
    assert sum(splits.sizes()) == 1797
    assert splits.train[0][0].shape == (1, 16, 16)


def _write_images(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(10 + i, 12, 3), dtype=np.uint8)
            mode_image = Image.fromarray(pixels)
            if i % 2:
                mode_image = mode_image.convert("L")  # mixed grey and colour files
            mode_image.save(root / name / f"{i}.png")
        (root / name / "notes.txt").write_text("not an image")


def test_image_folder(tmp_path: Path) -> None:
    _write_images(tmp_path, {"cat": 6, "dog": 4})
    data = load_image_folder(tmp_path, image_size=8)
    assert data.images.shape == (10, 3, 8, 8)
    assert data.class_names == ("cat", "dog")
    assert data.labels.tolist() == [0] * 6 + [1] * 4
    assert 0.0 <= float(data.images.min()) and float(data.images.max()) <= 1.0
    grey = load_image_folder(tmp_path, image_size=8, mode="L")
    assert grey.images.shape == (10, 1, 8, 8)
    splits = load_dataset(str(tmp_path), image_size=8, holdout_fraction=0.2, test_fraction=0.2)
    assert splits.sizes() == (6, 2, 2) and splits.input_shape == (3, 8, 8)


def test_image_folder_with_own_test_split(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 5, "b": 5})
    _write_images(tmp_path / "test", {"a": 2, "b": 1})
    splits = load_dataset(f"folder:{tmp_path}", image_size=8, holdout_fraction=0.2)
    assert splits.sizes() == (8, 2, 3)
    assert splits.test.tensors[1].tolist() == [0, 0, 1]  # type: ignore[attr-defined]


def test_user_data_factory() -> None:
    splits = load_dataset("tests.helpers_data:make_data", holdout_fraction=0.25, test_fraction=0.25)
    assert splits.sizes() == (30, 15, 15)
    assert splits.num_classes == 3 and splits.input_shape == (1, 6, 6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cifar100", "unknown data set 'cifar100'.*mnist_5k"),
        ("/no/such/folder", "directory not found"),
        ("folder:/no/such/folder", "directory not found"),
        ("tests.helpers_data:make_bad_data", "returned dict"),
        ("tests.no_such_module:f", "cannot import module"),
        ("tests.helpers_data:nothing", "has no callable 'nothing'"),
    ],
)
def test_load_dataset_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset(spec)


def test_bad_fractions_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be < 1"):
        load_dataset("digits", holdout_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        load_dataset("digits", test_fraction=-0.1)
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(tmp_path)
