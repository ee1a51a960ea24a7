"""Export a (pruned) torch model to one self-contained ONNX file, and check it against torch.

The exporter is torch's TorchScript-based one (`dynamo=False`), opset 17: on torch 2.13 it
takes ~0.1 s for a small CNN, embeds the weights in the model proto and needs no onnxscript.
It emits DeprecationWarnings (silenced here). Should a later torch drop it, the torch.export
based exporter is used instead, with `external_data=False` so the weights stay in the file;
that exporter writes opset 18 (it cannot down-convert these graphs to 17), which ONNX Runtime
runs as well.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from host.graph.analysis import logits_of

__all__ = ["OPSET", "export_onnx", "check_onnx"]

logger = logging.getLogger(__name__)

OPSET = 17
_DYNAMO_OPSET = 18  # the lowest opset the torch.export-based exporter writes
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def export_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    path: str | os.PathLike[str] | None = None,
    *,
    opset: int = OPSET,
) -> bytes:
    """The ONNX model of `model` in eval mode for a fixed input of `input_shape` (N, C, H, W).

    The model itself is not changed (a copy is put in eval mode). Inputs and outputs are named
    "input" and "output". When `path` is given the bytes are also written there.

    Raises:
        RuntimeError: neither exporter could export the model (the message has both causes).
    """
    frozen = copy.deepcopy(model).eval()
    example = torch.zeros(tuple(int(d) for d in input_shape))  # (N, C, H, W)
    try:
        data = _export_torchscript(frozen, example, opset)
    except Exception as legacy_exc:  # noqa: BLE001 - fall back to the other exporter
        logger.warning("TorchScript ONNX export failed (%s); trying torch.export", legacy_exc)
        try:
            data = _export_dynamo(frozen, example, max(opset, _DYNAMO_OPSET))
        except Exception as dynamo_exc:  # noqa: BLE001
            raise RuntimeError(
                f"ONNX export failed: TorchScript exporter: {legacy_exc}; torch.export "
                f"exporter: {dynamo_exc}"
            ) from dynamo_exc
    if path is not None:
        Path(path).write_bytes(data)
    logger.debug("exported %s to ONNX: %d bytes", type(model).__name__, len(data))
    return data


def _export_torchscript(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # ZeroPad2d's pads are computed by a small subgraph; ORT folds it at load time
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        target = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(target),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            do_constant_folding=True,
        )
        return target.read_bytes()


def _export_dynamo(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        target = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            str(target),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            external_data=False,
            verbose=False,
        )
        return target.read_bytes()


def check_onnx(
    model: nn.Module,
    onnx_model: bytes,
    input_shape: Sequence[int],
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Run `onnx_model` in ONNX Runtime (CPU) and `model` in torch (eval) on the same random
    input; returns the largest absolute difference of the first output (the logits).

    Raises:
        ValueError: the outputs differ beyond `atol + rtol * |torch output|`, or their shapes
            differ.
    """
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(int(d) for d in input_shape), generator=generator)  # (N, C, H, W)
    frozen = copy.deepcopy(model).eval()
    with torch.no_grad():
        expected = logits_of(frozen(x)).numpy()
    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # the first output
    if got.shape != expected.shape:
        raise ValueError(f"ONNX output shape {got.shape} differs from torch {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not np.allclose(got, expected, rtol=rtol, atol=atol):
        raise ValueError(f"ONNX output differs from torch by up to {diff:.3g}")
    return diff
