"""Everything NetAdapt needs from a model's structure, checked in seconds before any training
or measuring: each precondition is handled (with a one-line warning naming the layer and why)
or refused (an `UnsupportedLayerError` naming the layer, the op and what to change).

Checked, in order:

1. what the model returns, in eval mode and in training mode: the logits `(N, classes)`, or a
   tuple whose first element they are (auxiliary heads' logits after them, as GoogLeNet and
   Inception return while training); anything else is refused;
2. frozen parameters (`requires_grad=False`): analysed and pruned by structure like the rest,
   left frozen by fine-tuning; a model with nothing trainable is refused;
3. modules that run only in training mode (auxiliary heads): not measured, pruned with the
   layers that feed them;
4. every op has a unit (`host.graph.units`), else refused by name;
5. the prunable groups (`host.graph.groups`): each group kept whole is warned about with its
   reason (added to the network input, reshaped by a constant size, ...); a model with no
   prunable group at all is refused with those reasons.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from host.graph.groups import GroupReport, analyse_groups
from host.graph.units import FusionUnit, UnsupportedLayerError, extract_units

__all__ = ["ModelReport", "analyse_model", "logits_of"]

log = logging.getLogger(__name__)

_WARNED: set[str] = set()  # each warning once per process (a model is often analysed twice)


@dataclass
class ModelReport:
    """What the analysis found: units, groups (and those kept), and the warnings it gave."""

    units: list[FusionUnit]
    groups: GroupReport
    warnings: list[str] = field(default_factory=list)
    training_only: list[str] = field(default_factory=list)  # modules run only while training
    frozen: list[str] = field(default_factory=list)  # modules with frozen parameters


def logits_of(output: Any) -> torch.Tensor:
    """The logits in what a model returns: the tensor itself, or the first element of a tuple
    or list (GoogLeNet's and Inception's training outputs put the auxiliary logits after it).

    Raises:
        TypeError: the output is neither (the message says what it is).
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returns {_kind(output)}, not logits or a tuple with the "
                    f"logits first")


def _kind(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, dict):
        return f"a dict (keys {', '.join(map(str, list(output)[:4]))})"
    if isinstance(output, (tuple, list)):
        inner = ", ".join(_kind(o) for o in output[:3])
        return f"a {type(output).__name__} of {len(output)} ({inner})"
    return f"a {type(output).__name__}"


def _run(model: nn.Module, shape: tuple[int, ...], training: bool) -> tuple[Any, set[str]]:
    """The output of a forward pass in the given mode, and the modules that ran (on a copy, so
    BatchNorm statistics of the caller's model stay as they were)."""
    copied = copy.deepcopy(model).train(training)
    ran: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda _m, _a, name=name: ran.add(name))
             for name, m in copied.named_modules() if name]
    batch = max(2, shape[0]) if training else shape[0]  # BatchNorm trains on more than one
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # dropout draws from it
            out = copied(torch.zeros((batch, *shape[1:])))
    except Exception as exc:  # noqa: BLE001 - the model's own forward failed
        mode = "training" if training else "eval"
        first = (str(exc).splitlines() or [""])[0]
        raise UnsupportedLayerError(
            f"the model's forward fails in {mode} mode on an input of shape "
            f"{(batch, *shape[1:])}: {type(exc).__name__}: {first}") from exc
    finally:
        for h in hooks:
            h.remove()
    return out, ran


def _check_output(output: Any, batch: int, mode: str) -> int:
    """The number of classes; refuses outputs that are not logits."""
    try:
        logits = logits_of(output)
    except TypeError as exc:
        raise UnsupportedLayerError(
            f"in {mode} mode {exc}; return the (N, classes) logits, or a tuple with them "
            f"first") from None
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise UnsupportedLayerError(
            f"in {mode} mode the model returns logits of shape {tuple(logits.shape)}; NetAdapt "
            f"fine-tunes classifiers: return (N, classes) logits (flatten or pool the last "
            f"feature map)")
    if isinstance(output, (tuple, list)):
        for i, extra in enumerate(output[1:], start=1):
            if isinstance(extra, torch.Tensor) and tuple(extra.shape) != tuple(logits.shape):
                raise UnsupportedLayerError(
                    f"in {mode} mode output {i} has shape {tuple(extra.shape)}, not the logits' "
                    f"{tuple(logits.shape)}; auxiliary outputs must be logits too")
    return int(logits.shape[1])


def _top_level(names: set[str]) -> list[str]:
    """Names whose parent module is not in the set too."""
    out = sorted(n for n in names if not any(n.startswith(p + ".") for p in names if p != n))
    return out


def _warn(message: str, warnings: list[str]) -> None:
    warnings.append(message)
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def analyse_model(model: nn.Module, input_shape: Sequence[int],
                  require_groups: bool = True) -> ModelReport:
    """Checks `model` for NetAdapt on inputs of `input_shape` (N, C, H, W) and returns its units
    and groups. Warnings are logged once each (and returned); the model is not changed.

    Args:
        model: the network, in any mode.
        input_shape: (N, C, H, W) of one input batch (N is usually 1).
        require_groups: refuse a model in which nothing can be pruned.

    Raises:
        UnsupportedLayerError: the model cannot be adapted; the one-line message names the layer
            or op and what to change.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"input shape must be (N, C, H, W) with positive sizes, got {shape}")
    warnings: list[str] = []
    out_eval, ran_eval = _run(model, shape, training=False)
    classes = _check_output(out_eval, shape[0], "eval")
    out_train, ran_train = _run(model, shape, training=True)
    if _check_output(out_train, max(2, shape[0]), "training") != classes:
        raise UnsupportedLayerError(
            "the model returns a different number of classes in training and eval mode")
    if isinstance(out_train, (tuple, list)) and len(out_train) > 1:
        _warn(f"in training mode the model returns {len(out_train)} outputs: the first is "
              f"taken as the logits, the others as auxiliary logits (their losses added with "
              f"weight 0.3)", warnings)

    params = list(model.named_parameters())
    frozen_params = [n for n, p in params if not p.requires_grad]
    if params and len(frozen_params) == len(params):
        raise UnsupportedLayerError(
            "every parameter is frozen (requires_grad=False): nothing could be fine-tuned "
            "after pruning; unfreeze at least the classifier")
    frozen = _top_level({name for name, m in model.named_modules() if name
                         and any(True for _ in m.parameters())
                         and not any(p.requires_grad for p in m.parameters())})
    if frozen_params:
        _warn(f"{len(frozen_params)} of {len(params)} parameter tensors are frozen "
              f"(requires_grad=False) in {', '.join(frozen[:4])}"
              f"{' ...' if len(frozen) > 4 else ''}: they are pruned by structure like the rest "
              f"and fine-tuning leaves them frozen", warnings)

    training_only = _top_level(ran_train - ran_eval)
    if training_only:
        _warn(f"layers that run only in training mode ({', '.join(training_only[:4])}"
              f"{' ...' if len(training_only) > 4 else ''}) are not measured on the device; "
              f"they are pruned with the layers that feed them", warnings)

    units = extract_units(model, shape)
    report = analyse_groups(model, shape, units)
    for message in report.warnings:
        _warn(message, warnings)
    if require_groups and not report.groups:
        reasons = "; ".join(k.describe() for k in report.kept[:3]) or "it has no conv or linear"
        raise UnsupportedLayerError(f"nothing in the model can be pruned: {reasons}")
    return ModelReport(units, report, warnings, training_only, frozen)
