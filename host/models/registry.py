"""Model names -> constructors: the built-in networks and ``package.module:factory`` user models.

``build_model`` is the one place a model name is turned into an ``nn.Module``. A user model is
any importable callable that returns an ``nn.Module``; keyword arguments are passed through.
``torchvision:NAME`` (or ``torchvision.models:NAME``) is any of torchvision's classification
models with random weights; ``mobilenet_v3_small`` is one of them, built in.
``build_model_for`` additionally fills in ``num_classes`` / ``in_channels`` / ``input_size`` from
a data set, for built-ins always and for user factories only where their signature accepts them.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from host.models.efficientnet_lite import efficientnet_lite0
from host.models.mobilenet_v1 import MobileNetV1
from host.models.mobilenet_v2 import MobileNetV2
from host.models.tiny_cnn import TinyCNN
from host.models.torchvision_zoo import torchvision_factory

__all__ = [
    "build_model",
    "build_model_for",
    "default_input_shape",
    "is_builtin",
    "list_models",
    "resolve_factory",
]

logger = logging.getLogger(__name__)

ModelFactory = Callable[..., nn.Module]

_BUILTINS: dict[str, ModelFactory] = {
    "mobilenet_v1": MobileNetV1,
    "mobilenet_v2": MobileNetV2,
    "efficientnet_lite0": efficientnet_lite0,
    "tiny_cnn": TinyCNN,
    "mobilenet_v3_small": torchvision_factory("mobilenet_v3_small"),
}
# Input (C, H, W) each built-in was designed for; data sets override it.
_NATIVE_INPUT_SHAPE: dict[str, tuple[int, int, int]] = {
    "mobilenet_v1": (3, 224, 224),
    "mobilenet_v2": (3, 224, 224),
    "efficientnet_lite0": (3, 224, 224),
    "tiny_cnn": (1, 28, 28),
    "mobilenet_v3_small": (3, 224, 224),
}
_TORCHVISION_PREFIXES = ("torchvision:", "torchvision.models:")
_SPEC_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DATA_KWARGS = ("num_classes", "in_channels", "input_size")


def list_models() -> list[str]:
    """Names of the built-in models, sorted."""
    return sorted(_BUILTINS)


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a built-in model (as opposed to a ``module:factory`` spec)."""
    return name in _BUILTINS


def resolve_factory(name: str) -> ModelFactory:
    """The callable that builds model ``name``, without calling it.

    Raises:
        ValueError: If ``name`` is neither a built-in nor an importable ``package.module:factory``.
    """
    if name in _BUILTINS:
        return _BUILTINS[name]
    for prefix in _TORCHVISION_PREFIXES:
        if name.startswith(prefix):
            from host.models.torchvision_zoo import torchvision_models

            model = name[len(prefix):]
            try:
                known = torchvision_models()
            except ImportError as err:
                raise ValueError(f"model {name!r}: {err}") from err
            if model not in known:
                raise ValueError(f"model {name!r}: torchvision has no classification model "
                                 f"{model!r}; choose one of {', '.join(known)}")
            return torchvision_factory(model)
    if not _SPEC_RE.match(name):
        raise ValueError(
            f"unknown model {name!r}: expected one of {', '.join(list_models())} "
            "or a user model as 'package.module:factory'"
        )
    module_name, attr = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {name!r}: cannot import module {module_name!r}: {err}") from err
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"model {name!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ValueError(f"model {name!r}: {attr!r} is not callable")
    return factory  # type: ignore[no-any-return]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by built-in name or ``package.module:factory`` spec.

    Args:
        name: One of ``list_models()``, or ``"package.module:factory"``.
        **kwargs: Passed to the constructor / factory unchanged.

    Returns:
        The model, in training mode as constructed.

    Raises:
        ValueError: Unknown name, import failure, or a factory that does not return an
            ``nn.Module``.
    """
    factory = resolve_factory(name)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model factory {name!r} returned {type(model).__name__}, expected a torch.nn.Module"
        )
    logger.debug("built model %s (%s)", name, type(model).__name__)
    return model


def build_model_for(
    name: str, input_shape: tuple[int, int, int], num_classes: int, **kwargs: Any
) -> nn.Module:
    """Build a model sized for a data set.

    ``num_classes``, ``in_channels`` (= ``input_shape[0]``) and ``input_size`` (= height) are
    added to ``kwargs`` unless already there; for a user factory only those its signature
    accepts (all of them if it takes ``**kwargs``).

    Raises:
        ValueError: As ``build_model``.
    """
    data_kwargs = {
        "num_classes": num_classes,
        "in_channels": input_shape[0],
        "input_size": input_shape[1] if input_shape[1] == input_shape[2] else input_shape[1:],
    }
    accepted = _accepted_kwargs(resolve_factory(name), _DATA_KWARGS)
    for key in accepted:
        kwargs.setdefault(key, data_kwargs[key])
    return build_model(name, **kwargs)


def default_input_shape(name: str, dataset: str | None = None) -> tuple[int, int, int]:
    """Input ``(C, H, W)`` for model ``name``: the data set's if known, else the model's own.

    Args:
        name: Model name or spec.
        dataset: A built-in data set name (see ``host.data.BUILTIN_DATASETS``), or ``None``.

    Raises:
        ValueError: If neither the data set nor the model has a known input shape.
    """
    if dataset is not None:
        from host.data import BUILTIN_DATASETS  # local: models do not otherwise need data

        if dataset in BUILTIN_DATASETS:
            return BUILTIN_DATASETS[dataset].input_shape
    if name in _NATIVE_INPUT_SHAPE:
        return _NATIVE_INPUT_SHAPE[name]
    if name.startswith(_TORCHVISION_PREFIXES):
        return (3, 299, 299) if name.endswith(":inception_v3") else (3, 224, 224)
    raise ValueError(
        f"no default input shape for model {name!r} with data set {dataset!r}; "
        "pass the input shape explicitly"
    )


def _accepted_kwargs(factory: ModelFactory, keys: tuple[str, ...]) -> list[str]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing extra
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return list(keys)
    return [k for k in keys if k in params]
