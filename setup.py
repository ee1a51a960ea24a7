"""Generates the gRPC code from protos/ as part of every build (wheel, sdist, editable).

The generated *_pb2*.py files are build outputs: never committed, never edited.
"""

from __future__ import annotations

import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent.resolve()


def _googleapis_include() -> str:
    """Where google/rpc/status.proto is: googleapis-common-protos (build-system requires)."""
    import google.rpc

    return str(pathlib.Path(list(google.rpc.__path__)[0]).parent.parent)


def generate_protos() -> None:
    import importlib.resources

    from grpc_tools import protoc  # build-time dependency (pyproject build-system)

    # protoc.main, unlike `python -m grpc_tools.protoc`, does not add the well-known types
    # (google/protobuf/any.proto, which google/rpc/status.proto imports): name them.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    for proto in sorted((ROOT / "protos").glob("*.proto")):
        rel = str(proto)
        args = ["protoc", f"-I{ROOT}", f"-I{_googleapis_include()}", f"-I{well_known}",
                f"--python_out={ROOT}", f"--grpc_python_out={ROOT}", f"--pyi_out={ROOT}", rel]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
