"""Training loop, evaluation, BatchNorm recalibration and the cached base model, on the tiny
net and the 8x8 digits so each test takes about a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import host.training
from host.data import DataSplits, load_dataset
from host.models import TinyCNN
from host.training import (
    TrainConfig,
    evaluate,
    fine_tune,
    pretrained_base,
    recalibrate_batchnorm,
    train,
)
from tests.helpers_models import ConstantClassifier


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits", seed=0)


def _tiny(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(num_classes=10, in_channels=1, input_size=8)


def test_train_decreases_loss_and_evaluate_returns_fraction(digits: DataSplits) -> None:
    model = _tiny()
    before = evaluate(model, digits.holdout)
    result = train(model, digits.train, TrainConfig(max_steps=40, lr=1e-2, batch_size=32), False)
    assert result.steps == 40 and len(result.losses) == 40
    assert result.epochs == pytest.approx(40 / (len(digits.train) // 32))  # type: ignore[arg-type]
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    after = evaluate(model, digits.holdout)
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert after > before and after > 0.3
    assert not model.training


def test_evaluate_is_top1_accuracy(digits: DataSplits) -> None:
    labels = digits.test.tensors[1]  # type: ignore[attr-defined]
    expected = float((labels == 3).float().mean())
    model = ConstantClassifier(label=3).train()
    assert evaluate(model, digits.test, batch_size=50) == pytest.approx(expected)
    assert model.training  # mode restored


def test_train_is_deterministic_and_leaves_global_rng_alone(digits: DataSplits) -> None:
    config = TrainConfig(max_steps=8, batch_size=32, seed=5)
    a, b = _tiny(), _tiny()
    rng_state = torch.get_rng_state()
    train(a, digits.train, config, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_state)
    train(b, digits.train, config, progress=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    c = _tiny()
    train(c, digits.train, TrainConfig(max_steps=8, batch_size=32, seed=6), progress=False)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_fine_tune_runs_exact_steps_across_epochs() -> None:
    data = TensorDataset(torch.randn(40, 1, 8, 8), torch.arange(40) % 10)
    result = fine_tune(_tiny(), data, 7, TrainConfig(epochs=1, batch_size=16, optimizer="sgd"))
    assert result.steps == 7 and result.epochs == pytest.approx(3.5)  # 2 full batches / epoch


def test_train_config_validation() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_recalibrate_batchnorm_matches_data_statistics(digits: DataSplits) -> None:
    model = _tiny()
    model.stem.bn.momentum = 0.3
    images = digits.train.tensors[0]  # type: ignore[attr-defined]
    seen = recalibrate_batchnorm(model, digits.train, num_batches=1, batch_size=len(images))
    assert seen == len(images)
    assert model.stem.bn.momentum == 0.3 and model.down.bn.momentum == 0.1  # restored
    assert not model.training
    assert int(model.stem.bn.state_dict()["num_batches_tracked"]) == 1
    with torch.no_grad():
        conv_out = model.stem.conv(images)  # (N, C0, 8, 8)
    torch.testing.assert_close(model.stem.bn.running_mean, conv_out.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(
        model.stem.bn.running_var, conv_out.var(dim=(0, 2, 3)), rtol=1e-3, atol=1e-5
    )


def test_recalibrate_batchnorm_changes_stale_stats(digits: DataSplits) -> None:
    model = _tiny()
    train(model, digits.train, TrainConfig(max_steps=10, batch_size=32), progress=False)
    with torch.no_grad():  # as after pruning: the stats no longer fit the weights
        model.down.conv.weight.mul_(2.0)
    stale = model.down.bn.state_dict()["running_var"].clone()
    seen = recalibrate_batchnorm(model, digits.train, num_batches=3, batch_size=32)
    assert seen == 96
    stats = model.down.bn.state_dict()
    assert int(stats["num_batches_tracked"]) == 3
    assert not torch.allclose(stats["running_var"], stale)


def test_recalibrate_without_batchnorm_is_a_no_op() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(8, 1, 2, 2), torch.zeros(8, dtype=torch.long))
    assert recalibrate_batchnorm(model, data) == 0


def test_pretrained_base_is_cached(
    digits: DataSplits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrainConfig(max_steps=6, batch_size=32, lr=1e-2)
    first = pretrained_base("tiny_cnn", "digits", tmp_path, config, splits=digits, progress=False)
    assert not first.from_cache and first.path.is_file() and first.train_result is not None
    assert 0.0 <= first.holdout_accuracy <= 1.0

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached base model was retrained")

    monkeypatch.setattr(host.training, "train", no_training)
    second = pretrained_base("tiny_cnn", "digits", tmp_path, config, splits=digits, progress=False)
    assert second.from_cache and second.path == first.path
    assert second.test_accuracy == first.test_accuracy
    for (name, x), y in zip(
        first.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name
    monkeypatch.undo()

    # Another seed or other model arguments are another base model.
    other = pretrained_base(
        "tiny_cnn", "digits", tmp_path, config, splits=digits, progress=False, channels=(8, 8, 8)
    )
    assert not other.from_cache and other.path != first.path


def test_pretrained_base_retrains_on_corrupt_cache(digits: DataSplits, tmp_path: Path) -> None:
    config = TrainConfig(max_steps=2, batch_size=32)
    first = pretrained_base("tiny_cnn", "digits", tmp_path, config, splits=digits, progress=False)
    first.path.write_bytes(b"not a checkpoint")
    again = pretrained_base("tiny_cnn", "digits", tmp_path, config, splits=digits, progress=False)
    assert not again.from_cache
    assert isinstance(again.model, TinyCNN) and isinstance(first.model, TinyCNN)
    assert torch.equal(again.model.classifier.weight, first.model.classifier.weight)
