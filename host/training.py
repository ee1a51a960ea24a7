"""Training, evaluation, BatchNorm recalibration and the cached pretrained base model.

Everything here is deterministic given ``TrainConfig.seed``: shuffling uses a seeded
``torch.Generator`` and the global RNG (dropout, stochastic depth, fresh layers) is seeded inside
``torch.random.fork_rng`` so the caller's RNG state is left as it was. The number of CPU threads
is whatever the caller set.

A model may return a tuple (GoogLeNet and Inception do while training): the first element is the
logits, and each further one auxiliary logits whose loss is added with weight
``AUX_LOSS_WEIGHT``; evaluation reads the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from host.data import DataSplits, load_dataset
from host.graph.analysis import logits_of
from host.models.registry import build_model_for
from host.progress import Progress

__all__ = [
    "AUX_LOSS_WEIGHT",
    "PretrainedBase",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "fine_tune",
    "pretrained_base",
    "recalibrate_batchnorm",
    "train",
]

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the cache file layout or key changes
AUX_LOSS_WEIGHT = 0.3  # auxiliary heads' losses, as GoogLeNet's and Inception's recipes weigh them


@dataclass(frozen=True)
class TrainConfig:
    """How to train. All fields but ``device`` are part of the base-model cache key."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None  # set: exactly this many iterations, ``epochs`` ignored
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine decays to 0 at the end
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if self.batch_size < 1 or self.epochs < 0 or self.lr <= 0:
            raise ValueError(
                f"need batch_size >= 1, epochs >= 0, lr > 0; got {self.batch_size}, "
                f"{self.epochs}, {self.lr}"
            )
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")


@dataclass
class TrainResult:
    """What a training run did."""

    steps: int
    epochs: float  # passes over the data, fractional when stopped by ``max_steps``
    seconds: float
    losses: list[float] = field(default_factory=list, repr=False)  # per step, training mode

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last (up to) 10 steps; NaN when no step ran."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else math.nan


@dataclass
class PretrainedBase:
    """The base model NetAdapt starts from, with the data it was trained on."""

    model: nn.Module  # in eval mode
    splits: DataSplits
    holdout_accuracy: float
    test_accuracy: float
    from_cache: bool
    path: Path  # the cache file
    train_result: TrainResult | None = None  # None when loaded from the cache


def train(
    model: nn.Module, dataset: Dataset[Any], config: TrainConfig, progress: bool | Progress = True
) -> TrainResult:
    """Train ``model`` in place with cross-entropy; leaves it in eval mode.

    Args:
        model: Moved to ``config.device``.
        dataset: Yields ``(image, label)``.
        config: Epochs (or ``max_steps``), batch size, optimiser, seed.
        progress: Show a tqdm bar with the running loss.

    Returns:
        Steps run, passes over the data, wall time and the per-step losses.

    Raises:
        ValueError: If the data set is empty.
        FloatingPointError: If the loss becomes NaN or infinite.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot train on an empty data set")
    device = torch.device(config.device)
    model.to(device)
    # A last batch of a few images gives noisy BN statistics; drop it unless it is all we have.
    drop_last = n >= config.batch_size
    batches_per_epoch = n // config.batch_size if drop_last else 1
    total = config.max_steps if config.max_steps is not None else config.epochs * batches_per_epoch
    optimizer = _make_optimizer(model, config)
    scheduler = None
    if config.lr_schedule == "cosine" and total > 0:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
        )
    loss_fn = nn.CrossEntropyLoss()
    losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(config.seed),
        )
        model.train()
        # A host.progress.Progress: bars on a terminal, a line per epoch elsewhere.
        lines = progress if isinstance(progress, Progress) else None
        bar_cm = (progress.bar(total, "train", "step") if isinstance(progress, Progress)
                  else tqdm(total=total, disable=not progress, desc="train", unit="step",
                            leave=False))
        with bar_cm as bar:
            while len(losses) < total:
                for images, labels in loader:
                    images, labels = images.to(device), labels.to(device)
                    loss = _loss(loss_fn, model(images), labels)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise FloatingPointError(
                            f"training loss is {value} at step {len(losses) + 1}; "
                            f"try a lower learning rate than {config.lr}"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    losses.append(value)
                    bar.update(1)
                    bar.set_postfix_str(f"loss={value:.3f}")
                    if lines is not None and len(losses) % batches_per_epoch == 0:
                        recent = losses[-batches_per_epoch:]
                        lines.event(f"epoch {len(losses) // batches_per_epoch}/"
                                    f"{math.ceil(total / batches_per_epoch)}: mean loss "
                                    f"{sum(recent) / len(recent):.4f}, "
                                    f"{time.perf_counter() - start:.0f} s")
                    if len(losses) >= total:
                        break
    model.eval()
    seconds = time.perf_counter() - start
    result = TrainResult(len(losses), len(losses) / batches_per_epoch, seconds, losses)
    logger.info(
        "trained %d steps (%.2f epochs) in %.1f s, final loss %.4f",
        result.steps,
        result.epochs,
        seconds,
        result.final_loss,
    )
    return result


def fine_tune(
    model: nn.Module,
    dataset: Dataset[Any],
    steps: int,
    config: TrainConfig,
    progress: bool | Progress = False,
) -> TrainResult:
    """Short-term fine-tune: exactly ``steps`` iterations with ``config``'s optimiser and seed."""
    return train(model, dataset, dataclasses.replace(config, max_steps=steps), progress=progress)


def at_chance(accuracy: float, num_classes: int, samples: int) -> bool:
    """Whether ``accuracy`` on ``samples`` images is indistinguishable from guessing.

    Guessing among ``num_classes`` scores 1 / num_classes; an accuracy within two binomial
    standard errors above that (about 97.7% one-sided) is at chance. A base network at chance
    gives NetAdapt nothing to select proposals by: every proposal's holdout accuracy is noise.

    Raises:
        ValueError: If ``num_classes`` < 2 or ``samples`` < 1.
    """
    if num_classes < 2 or samples < 1:
        raise ValueError(f"need >= 2 classes and >= 1 sample, got {num_classes} and {samples}")
    chance = 1.0 / num_classes
    return accuracy <= chance + 2.0 * math.sqrt(chance * (1.0 - chance) / samples)


@dataclass(frozen=True)
class Evaluation:
    """A model scored on a data set: top-1 accuracy (fraction in [0, 1]) and mean
    cross-entropy (nats per image)."""

    accuracy: float
    loss: float


@torch.no_grad()
def score(model: nn.Module, dataset: Dataset[Any], batch_size: int = 256) -> Evaluation:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``dataset``.

    The loss is a steadier signal than the accuracy on a few hundred images: it moves with
    every image's confidence, not only with the ones that flip. Runs in eval mode without
    gradients; the model's previous train/eval mode is restored.

    Raises:
        ValueError: If the data set is empty.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("cannot evaluate on an empty data set")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = logits_of(model(images.to(device)))  # (B, num_classes)
        labels = labels.to(device)
        correct += int((logits.argmax(dim=1) == labels).sum())
        loss_sum += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        total += int(labels.numel())
    model.train(was_training)
    return Evaluation(accuracy=correct / total, loss=loss_sum / total)


def evaluate(model: nn.Module, dataset: Dataset[Any], batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``dataset``, as a fraction in [0, 1] (see `score`).

    Raises:
        ValueError: If the data set is empty.
    """
    return score(model, dataset, batch_size).accuracy


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    dataset: Dataset[Any],
    num_batches: int = 50,
    batch_size: int = 64,
    seed: int = 0,
) -> int:
    """Recompute BatchNorm running statistics from training data (after pruning, say).

    Running stats are reset and re-estimated as a plain average over up to ``num_batches``
    shuffled batches (``momentum=None``), with only the BN layers in training mode so dropout
    and stochastic depth stay off. Each BN's momentum is restored and the model left in eval
    mode.

    Returns:
        The number of images used (0 when the model has no BatchNorm with running stats).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns or num_batches <= 0:
        model.eval()
        return 0
    device = _model_device(model)
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
        bn.train()
    seen = 0
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    try:
        for i, (images, _) in enumerate(loader):
            if i >= num_batches:
                break
            model(images.to(device))
            seen += int(images.shape[0])
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.eval()
    logger.debug("recalibrated %d BatchNorm layers on %d images", len(bns), seen)
    return seen


def pretrained_base(
    model_name: str,
    dataset_name: str,
    cache_dir: str | os.PathLike[str],
    train_config: TrainConfig,
    *,
    data_seed: int = 0,
    splits: DataSplits | None = None,
    progress: bool | Progress = True,
    **model_kwargs: Any,
) -> PretrainedBase:
    """Train the base model once per (model, data set, config, seed); later calls load it.

    The model is built with ``host.models.build_model_for`` (sizes from the data set, plus
    ``model_kwargs``) under ``train_config.seed``, trained on the train split and cached as a
    state dict in ``cache_dir``. The cache key covers the model name and kwargs, data set name,
    ``data_seed``, split sizes and every ``TrainConfig`` field except ``device``.

    Args:
        model_name: Built-in name or ``package.module:factory``.
        dataset_name: Anything ``host.data.load_dataset`` accepts.
        cache_dir: Folder for cached weights (created if missing).
        train_config: How to train the base model.
        data_seed: Seed of the train / holdout / test split.
        splits: Already loaded splits of ``dataset_name`` (skips loading).
        progress: Show a progress bar while training.
        **model_kwargs: Passed to the model constructor (must be JSON-serialisable for the key).

    Returns:
        The model in eval mode, its splits and holdout / test accuracy.
    """
    if splits is None:
        splits = load_dataset(dataset_name, seed=data_seed)
    config_fields = dataclasses.asdict(train_config)
    config_fields.pop("device")
    key = {
        "format": _CACHE_FORMAT,
        "model": model_name,
        "model_kwargs": model_kwargs,
        "dataset": dataset_name,
        "data_seed": data_seed,
        "split_sizes": list(splits.sizes()),
        "train": config_fields,
    }
    key_json = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{_slug(model_name)}__{_slug(dataset_name)}__{digest}.pt"

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_config.seed)  # fresh layers are part of the reproducible base
            return build_model_for(
                model_name, splits.input_shape, splits.num_classes, **model_kwargs
            )

    model = build()
    cached = _load_cache(path, key_json)
    if cached is not None:
        state_dict, meta = cached
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:  # the model's code changed since the file was written
            logger.warning("cached base model %s does not fit (%s); retraining", path, err)
            cached = None
            model = build()  # a failed load may have copied part of the weights
    if cached is not None:
        model.to(torch.device(train_config.device)).eval()
        logger.info("loaded base model %s on %s from %s", model_name, dataset_name, path)
        return PretrainedBase(
            model,
            splits,
            float(meta["holdout_accuracy"]),
            float(meta["test_accuracy"]),
            from_cache=True,
            path=path,
        )

    logger.info("training base model %s on %s (cache miss: %s)", model_name, dataset_name, path)
    result = train(model, splits.train, train_config, progress=progress)
    holdout_acc = evaluate(model, splits.holdout)
    test_acc = evaluate(model, splits.test)
    logger.info(
        "base model %s: holdout %.4f, test %.4f after %.1f s",
        model_name,
        holdout_acc,
        test_acc,
        result.seconds,
    )
    meta = {
        "key": key_json,
        "holdout_accuracy": holdout_acc,
        "test_accuracy": test_acc,
        "train_seconds": result.seconds,
        "steps": result.steps,
    }
    _save_cache(path, model, meta)
    return PretrainedBase(model, splits, holdout_acc, test_acc, False, path, result)


def _loss(loss_fn: nn.Module, output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits, plus `AUX_LOSS_WEIGHT` times that of each auxiliary output."""
    loss: torch.Tensor = loss_fn(logits_of(output), labels)
    if isinstance(output, (tuple, list)):
        for aux in output[1:]:
            if isinstance(aux, torch.Tensor):
                loss = loss + AUX_LOSS_WEIGHT * loss_fn(aux, labels)
    return loss


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_")[:60] or "x"


def _load_cache(path: Path, key_json: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        if meta["key"] != key_json:  # a digest collision or a hand-edited file
            logger.warning("cache file %s has a different key; retraining", path)
            return None
        return blob["state_dict"], meta
    except Exception as err:  # a truncated or foreign file must not stop the run
        logger.warning("cannot read cached base model %s (%s); retraining", path, err)
        return None


def _save_cache(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    logger.info("cached base model at %s", path)
