"""torchvision's classification models as NetAdapt networks, with random weights.

`torchvision_factory(name)` is a factory with the registry's data arguments (`num_classes`,
`in_channels`, `input_size`) that builds `torchvision.models.get_model(name, weights=None)`:
nothing is downloaded. A data set with other than 3 channels gets a first conv of its channel
count (random, like the rest).

torchvision's wheels on PyPI are built against torch's CUDA wheel; with the CPU wheel of the
same torch release their compiled detection ops (nms, roi_align, ...) cannot load, and
torchvision 0.28's import then fails registering fake kernels for two of them. Classification
models use none of these ops: `import_torchvision` declares the two schemas first when the
ops are missing, so the import succeeds, and the detection ops stay unavailable.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = ["import_torchvision", "torchvision_factory", "torchvision_models"]

logger = logging.getLogger(__name__)

_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # kept alive: dropping it removes the schemas


def _ops_missing() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    from pathlib import Path

    for folder in spec.submodule_search_locations:
        for lib in Path(folder).glob("_C*.so"):
            try:
                torch.ops.load_library(str(lib))
                return False
            except (OSError, RuntimeError):
                return True
    return True


def declare_missing_ops() -> None:
    """Declares the op schemas torchvision's import needs when its compiled ops cannot load
    (once per process; nothing when they load). `import host` runs this before the first
    `import torchvision` anywhere in the process."""
    global _library
    if "torchvision" in sys.modules or _library is not None or not _ops_missing():
        return
    logger.debug("torchvision's compiled ops do not load with this torch; declaring %s",
                 ", ".join(_OP_SCHEMAS))
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _OP_SCHEMAS.values():
        _library.define(schema)


def import_torchvision() -> ModuleType:
    """`torchvision`, imported so that its classification models work with a CPU torch.

    Raises:
        ImportError: torchvision is not installed (the message says how to install it).
    """
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError(
            "torchvision is not installed: pip install 'netadapt[host]' (or torchvision==0.28.0 "
            "--no-deps, the release built for torch 2.13)")
    declare_missing_ops()
    import torchvision

    return torchvision


def torchvision_models() -> list[str]:
    """Names of torchvision's classification models."""
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                new = nn.Conv2d(in_channels, child.out_channels,
                                child.kernel_size,  # type: ignore[arg-type]
                                child.stride,  # type: ignore[arg-type]
                                child.padding,  # type: ignore[arg-type]
                                child.dilation,  # type: ignore[arg-type]
                                child.groups, child.bias is not None)
                setattr(parent, child_name, new)
                return


def torchvision_factory(name: str) -> Callable[..., nn.Module]:
    """A factory for torchvision model `name` taking the registry's data arguments.

    Raises:
        ValueError: torchvision has no classification model of that name.
    """

    def build(num_classes: int = 1000, in_channels: int = 3, input_size: Any = 224,
              **kwargs: Any) -> nn.Module:
        tv = import_torchvision()
        if name not in tv.models.list_models(module=tv.models):
            raise ValueError(
                f"torchvision has no classification model {name!r}; choose one of "
                f"{', '.join(torchvision_models())}")
        with warnings.catch_warnings():
            # GoogLeNet/Inception warn that their default initialisation will change
            warnings.simplefilter("ignore", FutureWarning)
            model: nn.Module = tv.models.get_model(name, weights=None, num_classes=num_classes,
                                                   **kwargs)
        if in_channels != 3:
            _replace_first_conv(model, in_channels)
        return model

    build.__name__ = name
    build.__doc__ = f"torchvision's {name} (random weights), sized for a data set."
    return build
