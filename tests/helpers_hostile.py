"""Hostile ONNX models: each points a tensor (or a node) at a file on the daemon's machine, from
a different corner of the format. Used by the daemon security tests and `make bench-reliability`.

Every model reads 16 bytes (four float32) from `location` (default "token", the file a deployed
daemon keeps in its working directory) if a runtime were to honour it.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
from onnx import TensorProto, helper

__all__ = ["HOSTILE_MODELS", "NAMED", "external_tensor", "external_initializer_model",
           "TOKEN_BYTES"]

TOKEN_BYTES = 16  # what the models read: four float32


def external_tensor(name: str, location: str = "token", flag: bool = True,
                    dims: tuple[int, ...] = (4,),
                    data_type: int = TensorProto.FLOAT) -> TensorProto:
    """A tensor whose data lives in `location` (bytes 0..16). `flag=False` leaves
    `data_location` at DEFAULT and sets only the `external_data` entries."""
    t = TensorProto()
    t.name = name
    t.data_type = data_type
    t.dims.extend(dims)
    if flag:
        t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(TOKEN_BYTES))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


_X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
_Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])


def _model(graph: onnx.GraphProto, **kw: object) -> onnx.ModelProto:
    kw.setdefault("opset_imports", [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, **kw)
    model.ir_version = 8
    return model


def external_initializer_model(location: str = "token", flag: bool = True) -> onnx.ModelProto:
    """y = x + w, with w read from `location`: the simplest form of the attack."""
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [_X], [_Y],
                              [external_tensor("w", location, flag)])
    return _model(graph)


def _constant_value() -> onnx.ModelProto:
    node = helper.make_node("Constant", [], ["w"], value=external_tensor("c"))
    graph = helper.make_graph([node, helper.make_node("Add", ["x", "w"], ["y"])], "g", [_X], [_Y])
    return _model(graph)


def _attribute_tensor_list() -> onnx.ModelProto:
    node = helper.make_node("Identity", ["x"], ["y"])
    node.attribute.append(helper.make_attribute("payload", [external_tensor("listed")]))
    return _model(helper.make_graph([node], "g", [_X], [_Y]))


def _branch(name: str, tensor: TensorProto | None = None) -> onnx.GraphProto:
    out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [4])
    if tensor is None:
        return helper.make_graph([helper.make_node("Identity", ["x"], [f"{name}_out"])], name,
                                 [], [out])
    return helper.make_graph([helper.make_node("Add", ["x", tensor.name], [f"{name}_out"])],
                             name, [], [out], [tensor])


def _if_subgraph_initializer() -> onnx.ModelProto:
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    node = helper.make_node("If", ["cond"], ["y"],
                            then_branch=_branch("then", external_tensor("in_then")),
                            else_branch=_branch("else"))
    return _model(helper.make_graph([node], "g", [_X], [_Y], [cond]))


def _loop_body_constant() -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=external_tensor("in_loop")),
         helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("Add", ["v_in", "k"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4])])
    trip = helper.make_tensor("trip", TensorProto.INT64, [], [1])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    node = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body)
    return _model(helper.make_graph([node], "g", [_X], [_Y], [trip, cond]))


def _sparse(values: TensorProto, indices: TensorProto) -> onnx.SparseTensorProto:
    sparse = onnx.SparseTensorProto()
    sparse.dims.extend([4])
    sparse.values.CopyFrom(values)
    sparse.indices.CopyFrom(indices)
    return sparse


def _sparse_initializer(which: str) -> onnx.ModelProto:
    values = external_tensor("w") if which == "values" else helper.make_tensor(
        "w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    indices = external_tensor("w_idx", dims=(4,), data_type=TensorProto.INT64) \
        if which == "indices" else helper.make_tensor("w_idx", TensorProto.INT64, [4],
                                                       [0, 1, 2, 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [_X], [_Y])
    graph.sparse_initializer.append(_sparse(values, indices))
    return _model(graph)


def _sparse_constant() -> onnx.ModelProto:
    sparse = _sparse(external_tensor("sv"), helper.make_tensor("si", TensorProto.INT64, [4],
                                                               [0, 1, 2, 3]))
    node = helper.make_node("Constant", [], ["w"], sparse_value=sparse)
    graph = helper.make_graph([node, helper.make_node("Add", ["x", "w"], ["y"])], "g", [_X], [_Y])
    return _model(graph)


def _function_body() -> onnx.ModelProto:
    fn = helper.make_function(
        "local", "AddSecret", ["a"], ["b"],
        [helper.make_node("Constant", [], ["s"], value=external_tensor("in_function")),
         helper.make_node("Add", ["a", "s"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("AddSecret", ["x"], ["y"], domain="local")],
                              "g", [_X], [_Y])
    return _model(graph, functions=[fn],
                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])


def _training_info() -> onnx.ModelProto:
    model = _model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [_X],
                                     [_Y]))
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph(
        [helper.make_node("Constant", [], ["init_out"], value=external_tensor("in_training"))],
        "init", [], [helper.make_tensor_value_info("init_out", TensorProto.FLOAT, [4])]))
    return model


def _ep_context() -> onnx.ModelProto:
    node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft",
                            embed_mode=0, ep_cache_context="token")
    return _model(helper.make_graph([node], "g", [_X], [_Y]),
                  opset_imports=[helper.make_opsetid("", 17),
                                 helper.make_opsetid("com.microsoft", 1)])


HOSTILE_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "initializer": external_initializer_model,
    "initializer_readme": lambda: external_initializer_model("README.md"),
    "initializer_absolute": lambda: external_initializer_model("/etc/passwd"),
    "initializer_parent": lambda: external_initializer_model("../token"),
    "initializer_unflagged": lambda: external_initializer_model(flag=False),
    "constant_value": _constant_value,
    "attribute_tensor_list": _attribute_tensor_list,
    "if_subgraph_initializer": _if_subgraph_initializer,
    "loop_body_constant": _loop_body_constant,
    "sparse_initializer_values": lambda: _sparse_initializer("values"),
    "sparse_initializer_indices": lambda: _sparse_initializer("indices"),
    "sparse_constant": _sparse_constant,
    "function_body": _function_body,
    "training_info": _training_info,
    "ep_context_node": _ep_context,
}

# The tensor (or node) each refusal must name.
NAMED: dict[str, str] = {
    "initializer": "'w'", "initializer_readme": "'w'", "initializer_absolute": "'w'",
    "initializer_parent": "'w'", "initializer_unflagged": "'w'", "constant_value": "'c'",
    "attribute_tensor_list": "'listed'", "if_subgraph_initializer": "'in_then'",
    "loop_body_constant": "'in_loop'", "sparse_initializer_values": "'w'",
    "sparse_initializer_indices": "'w_idx'", "sparse_constant": "'sv'",
    "function_body": "'in_function'", "training_info": "'in_training'",
    "ep_context_node": "EPContext",
}
