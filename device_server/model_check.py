"""What the daemon refuses to load from a client: anything that names a file on the device.

An ONNX model can point outside itself: a tensor whose data is stored "externally" names a
file (`external_data` location) that ONNX Runtime reads relative to the daemon's working
directory, where a deployed daemon keeps its token and its log. Such tensors can sit anywhere
in a model: graph initializers, sparse initializers (values and indices), tensors in node
attributes (Constant `value`, `tensors` lists, sparse attributes), the graphs inside If / Loop /
Scan attributes, model-local functions, training-info graphs. An `EPContext` node names a
precompiled blob file the same way. So every message of the model is walked (generically, over
the protobuf fields, so a field added by a later ONNX version is not missed) and every tensor
checked with `onnx.external_data_helper`, before the model is stored or given to the runtime.

Provider options are the other place a client could name a file (engine caches, dump folders,
backend libraries): options whose name or value looks like a path are refused too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import onnx
from google.protobuf.message import Message
from onnx.external_data_helper import uses_external_data

from device_server.errors import InvalidConfigError

__all__ = ["check_self_contained", "check_provider_options", "EMBED_HINT"]

EMBED_HINT = (
    "embed the weights in the model before uploading it: m = onnx.load('model.onnx') (this "
    "reads the external files next to it), then onnx.save_model(m, 'embedded.onnx', "
    "save_as_external_data=False)"
)

# Node types that reference files by design (ONNX Runtime's precompiled-context nodes).
_FILE_NODES = {"EPContext"}
# Provider option names that, in one execution provider or another, name a file or folder.
_PATHLIKE_KEY = re.compile(r"path|dir|file|folder|cache|lib|location|dump|profil|prefix|config",
                           re.IGNORECASE)
_PATHLIKE_VALUE = re.compile(r"[/\\]|^\.|^~|\.(so|dll|dylib|bin|onnx|engine|json)$", re.IGNORECASE)


def _short(text: str, limit: int = 80) -> str:
    """A client-supplied string, quoted and cut, safe to put in a message or a log line."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _walk(model: onnx.ModelProto) -> Iterator[tuple[str, Message]]:
    """Every sub-message of `model` with a readable path to it, depth first (no recursion:
    a hostile model may nest graphs deeply). Tensors are yielded but not entered."""
    stack: list[tuple[str, Message]] = [("", model)]
    while stack:
        where, message = stack.pop()
        yield where, message
        if isinstance(message, onnx.TensorProto):
            continue
        children: list[tuple[str, Message]] = []
        prefix = f"{where}." if where else ""
        for field, value in message.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            if field.is_repeated:
                children.extend((f"{prefix}{field.name}[{i}]{_label(v)}", v)
                                for i, v in enumerate(value))
            else:
                children.append((f"{prefix}{field.name}{_label(value)}", value))
        stack.extend(reversed(children))


def _label(message: Message) -> str:
    name = getattr(message, "name", "")
    return f"({_short(name, 40)})" if isinstance(name, str) and name else ""


def _external_location(tensor: onnx.TensorProto) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


def check_self_contained(model: onnx.ModelProto) -> None:
    """Refuses a model that names any file: external tensor data anywhere, or file nodes.

    Raises:
        InvalidConfigError: naming the tensor (or node), where it sits, and how to embed it.
    """
    for where, message in _walk(model):
        if isinstance(message, onnx.TensorProto):
            if uses_external_data(message) or len(message.external_data):
                location = _external_location(message)
                raise InvalidConfigError(
                    f"tensor {_short(message.name or '(unnamed)', 60)} (at {where}) keeps its data "
                    f"outside the model (external_data location {_short(location)}); this "
                    f"daemon takes only self-contained models and never reads files a client "
                    f"names: {EMBED_HINT}"
                )
        elif isinstance(message, onnx.NodeProto) and message.op_type in _FILE_NODES:
            raise InvalidConfigError(
                f"node {_short(message.name or message.op_type, 60)} (at {where}) is an "
                f"{message.op_type} node, which refers to a precompiled file on the device; "
                f"upload the original model instead"
            )


def check_provider_options(options: Mapping[str, str] | tuple[tuple[str, str], ...]) -> None:
    """Refuses provider options that would make the runtime read or write a file.

    Raises:
        InvalidConfigError: naming the option.
    """
    items = options.items() if isinstance(options, Mapping) else options
    for key, value in items:
        if _PATHLIKE_KEY.search(key) or _PATHLIKE_VALUE.search(value):
            raise InvalidConfigError(
                f"provider option {_short(key, 60)}={_short(value)} names a file or folder on "
                f"the device; the daemon takes no paths from clients: set such options on the "
                f"device, or leave them out"
            )
