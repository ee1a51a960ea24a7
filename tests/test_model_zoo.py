"""torchvision's classification models (random weights, nothing downloaded) through analysis,
the channel planner and surgery: one of each kind of building block, at small inputs where the
shape logic is that of 224x224 (`make bench-models` runs all twelve acceptance models at 224).

For each: the planner's units of a random pruned configuration equal the units traced from the
pruned model, the pruned model exports to ONNX and matches torch, and it still runs in training
mode (auxiliary heads included)."""

from __future__ import annotations

import random

import pytest
import torch

from device_server.spec import OpKind
from host.graph import check_onnx, export_onnx, extract_units, unit_specs
from host.models.registry import build_model, build_model_for, default_input_shape, list_models
from host.network import Network, analyse

# (model, input size, what it exercises)
KINDS = [
    ("mobilenet_v3_small", 64, "squeeze-and-excitation with hard-sigmoid gates, hard-swish"),
    ("squeezenet1_1", 64, "fire modules: concatenations of two groups, ceil-mode pooling"),
    ("shufflenet_v2_x0_5", 64, "channel shuffle and split: the shuffled channels kept whole"),
    ("googlenet", 64, "four-way concatenations, auxiliary heads run only while training"),
    ("densenet121", 32, "dense blocks: wide concatenations kept, standalone BatchNorm/ReLU"),
]


def _network(name: str, size: int) -> Network:
    torch.manual_seed(0)
    model = build_model_for(f"torchvision:{name}", (3, size, size), 10)
    return analyse(name, model, (1, 3, size, size))


@pytest.mark.parametrize(("name", "size", "what"), KINDS, ids=[k[0] for k in KINDS])
def test_planner_matches_surgery_and_export(name: str, size: int, what: str) -> None:
    network = _network(name, size)
    shape = network.input_shape
    assert network.groups, what
    rng = random.Random(name)
    config = {g.id: max(1, int(g.channels * rng.uniform(0.3, 1.0))) for g in network.groups}
    pruned = network.pruned(config)
    assert unit_specs(extract_units(pruned, shape)) == network.specs(config)
    assert check_onnx(pruned, export_onnx(pruned, shape), shape) < 1e-3
    pruned.train()
    out = pruned(torch.randn(2, *shape[1:]))
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 10)


def test_what_each_kind_keeps_and_why() -> None:
    shuffle = _network("shufflenet_v2_x0_5", 64)
    reasons = " ".join(k.reason for k in shuffle.kept)
    assert "channel shuffle" in reasons
    assert {u.core.node_op for u in shuffle.units if u.core.op is OpKind.NODE} >= {
        "Concat", "Split", "Transpose", "Reshape"}
    assert any(g.root.endswith("branch2.0") for g in shuffle.groups)  # inside a branch

    google = _network("googlenet", 64)
    assert any("only in training mode" in w for w in google.warnings)
    assert all(not g.root.startswith("aux") for g in google.groups)
    feeding = next(g for g in google.groups if "aux1.conv.conv" in g.members)
    pruned = google.pruned({feeding.id: feeding.channels // 2})
    pruned.train()
    assert len(pruned(torch.randn(2, 3, 64, 64))) == 3  # logits and both auxiliary heads


def test_mobilenet_v3_small_is_built_in() -> None:
    assert "mobilenet_v3_small" in list_models()
    assert default_input_shape("mobilenet_v3_small") == (3, 224, 224)
    mnist = build_model_for("mobilenet_v3_small", (1, 28, 28), 10).eval()
    assert mnist(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # a first conv for one channel
    assert default_input_shape("torchvision:inception_v3") == (3, 299, 299)


def test_unknown_torchvision_model_is_refused_with_the_list() -> None:
    with pytest.raises(ValueError, match="no classification model 'resnet9000'.*resnet18"):
        build_model("torchvision:resnet9000")
