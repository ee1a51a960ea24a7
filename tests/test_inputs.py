"""Inputs of whole models (issue 14, row 6): an ONNX model whose integer input indexes a 2-row
table is timed with inputs inside the table by default (read from its graph), with the values
or ranges given (`--input NAME=int:LOW..HIGH`, `--inputs FILE.npz`), and refused in one line,
exit 2, saying how to fix it when the inputs given do not fit. A real daemon on loopback."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_server import wire
from device_server.errors import InvalidConfigError
from device_server.inputs import InputFeed, graph_ranges, make_input
from device_server.server import RunningServer
from host.cli.netadapt_bench import main as bench_main


def _gather_model(rows: int = 2, cast: bool = False, extra_int: bool = False) -> bytes:
    """ids (1, 4) int64 -> Gather(table (rows, 8)) -> (1, 4, 8); optionally through a Cast,
    and with an int input the graph says nothing about."""
    table = numpy_helper.from_array(np.random.default_rng(0).random((rows, 8), np.float32),
                                    "table")
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT32 if cast
                                            else TensorProto.INT64, [1, 4])]
    nodes = []
    indices = "ids"
    if cast:
        nodes.append(helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64))
        indices = "ids64"
    nodes.append(helper.make_node("Gather", ["table", indices], ["out"], axis=0))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8])]
    if extra_int:
        inputs.append(helper.make_tensor_value_info("count", TensorProto.INT64, [1]))
        nodes.append(helper.make_node("Identity", ["count"], ["count_out"]))
        outputs.append(helper.make_tensor_value_info("count_out", TensorProto.INT64, [1]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _bench(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = bench_main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture()
def gather_file(tmp_path: Path) -> Path:
    path = tmp_path / "gather.onnx"
    path.write_bytes(_gather_model())
    return path


def test_default_inputs_stay_inside_the_table(daemon: RunningServer, gather_file: Path) -> None:
    code, out, err = _bench("--device", daemon.address, "model", str(gather_file), "--json")
    assert code == 0, err
    assert '"median_ms"' in out


def test_ranges_and_npz_values_are_used(daemon: RunningServer, gather_file: Path,
                                        tmp_path: Path) -> None:
    code, _, err = _bench("--device", daemon.address, "model", str(gather_file),
                          "--input", "ids=int:0..1")
    assert code == 0, err
    npz = tmp_path / "ids.npz"
    np.savez(npz, ids=np.array([[0, 1, 1, 0]]))
    code, _, err = _bench("--device", daemon.address, "model", str(gather_file),
                          "--inputs", str(npz))
    assert code == 0, err


@pytest.mark.parametrize("how", ["range", "npz", "unknown", "bad-range"])
def test_inputs_that_do_not_fit_are_refused_in_one_line(daemon: RunningServer,
                                                        gather_file: Path, tmp_path: Path,
                                                        how: str,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    npz = tmp_path / "bad.npz"
    np.savez(npz, ids=np.array([[0, 1, 5, 0]]))
    extra = {"range": ["--input", "ids=int:0..5"], "npz": ["--inputs", str(npz)],
             "unknown": ["--input", "tokens=int:0..1"],
             "bad-range": ["--input", "ids=int:3..1"]}[how]
    code, _, err = _bench("--device", daemon.address, "model", str(gather_file), *extra)
    err += capsys.readouterr().err  # argparse's own errors go to sys.stderr
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and "INTERNAL" not in err
    if how in ("range", "npz"):
        assert "out of data bounds" in err and "--input NAME=int:LOW..HIGH" in err
    if how == "unknown":
        assert "no input 'tokens'" in err and "ids" in err


def test_graph_ranges_read_gathers_through_casts() -> None:
    ranges = graph_ranges(_gather_model(rows=7, cast=True, extra_int=True))
    assert ranges == {"ids": InputFeed.range(0, 6, integer=True)}  # nothing said about count
    rng = np.random.default_rng(0)
    values = make_input("ids", "tensor(int32)", (1, 1000), ranges["ids"], rng)
    assert values.dtype == np.int32 and values.min() == 0 and values.max() == 6


def test_feeds_round_trip_on_the_wire() -> None:
    feeds = {"ids": InputFeed(values=np.arange(6, dtype=np.int64).reshape(2, 3)),
             "x": InputFeed.range(-1.5, 2.0)}
    back = wire.feeds_from_proto(wire.feeds_to_proto(feeds))
    assert back["x"] == feeds["x"]
    assert back["ids"].values is not None
    assert back["ids"].values.dtype == np.int64 and back["ids"].values.shape == (2, 3)
    assert np.array_equal(back["ids"].values, feeds["ids"].values)  # type: ignore[arg-type]
    broken = wire.feeds_to_proto(feeds)
    broken["ids"].tensor.data = broken["ids"].tensor.data[:-1]
    with pytest.raises(InvalidConfigError, match="bytes do not hold 6 int64 values"):
        wire.feeds_from_proto(broken)


def test_unit_graphs_are_unaffected() -> None:
    """Layer units have float inputs only: no graph reading, standard normal values."""
    from device_server.builder import build_layer_model
    from device_server.spec import LayerSpec

    spec = LayerSpec.create("conv2d", (1, 4, 8, 8), out_channels=8, kernel=3, padding=1)
    assert graph_ranges(build_layer_model(spec).SerializeToString()) == {}
    onnx.checker.check_model(build_layer_model(spec))


def test_external_data_is_refused_saying_how_to_embed(daemon: RunningServer,
                                                      tmp_path: Path) -> None:
    """Row 7: weights in a separate .data file: exit 2, one line saying how to embed them; the
    model embedded as the message says is measured."""
    w = numpy_helper.from_array(np.random.default_rng(0).random((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    assert (tmp_path / "model.onnx.data").exists()
    code, _, err = _bench("--device", daemon.address, "model", str(path))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "save_as_external_data=False" in err
    embedded = tmp_path / "embedded.onnx"
    onnx.save_model(onnx.load(path), embedded, save_as_external_data=False)
    code, _, err = _bench("--device", daemon.address, "model", str(embedded))
    assert code == 0, err
