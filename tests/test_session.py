"""Sessions: a model's weights go to onnxruntime beside its graph, with the same outputs as a session from the file."""

import graphs
import numpy as np
import onnx
import pytest
from conftest import zoo_path

from scanner.context import ModelContext
from scanner.runtime import session as S


@pytest.mark.parametrize("name", ["cnn_badnets", "resnet_badnets"])
def test_detached_session_gives_the_file_sessions_outputs(name):
    path = zoo_path(name)
    model = onnx.load(path)
    before = model.SerializeToString()
    detached = S.detach(model)
    assert model.SerializeToString() == before  # the proto is not touched
    assert detached.weights and detached.skeleton.ByteSize() < len(before) / 10
    kept = {t.name for t in detached.skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert kept == set(detached.weights)
    x = np.random.RandomState(0).rand(3, 1, 28, 28).astype(np.float32)
    from_file, from_proto = S.Session(str(path), device="cpu"), S.Session(model, device="cpu")
    for a, b in zip(from_file.run(x).values(), from_proto.run(x).values()):
        np.testing.assert_array_equal(a, b)


def test_runner_instruments_the_graph_without_its_weights():
    """The instrumented copy is made of the weightless graph; the runner keeps no proto of it once the session runs."""
    ctx = ModelContext.open(zoo_path("resnet_badnets"))
    runner = ctx.runner(ctx.select("all"), norms=("linf", "l1", "l2"))
    assert runner.instrumented.model is None
    pixels = np.random.RandomState(1).randint(0, 256, (4, 28, 28, 1)).astype(np.uint8)
    out = runner.run(pixels)
    plain = ctx.runner().run(pixels)
    np.testing.assert_allclose(out.scores, plain.scores, rtol=1e-5, atol=1e-6)
    assert out.norms["linf"].shape == (4, runner.channels) and np.all(out.norms["linf"] >= 0)


def _session_calls(monkeypatch, runner):
    """The list that records the number of images of each of ``runner``'s session calls from now on."""
    calls = []
    run = runner.session.run
    monkeypatch.setattr(runner.session, "run", lambda x, *a, **k: calls.append(len(x)) or run(x, *a, **k))
    return calls


def test_large_measured_maps_run_in_smaller_session_calls(monkeypatch):
    """Where the measured maps of a batch would pass TAP_BYTES, the runner splits it into smaller session calls:
    the same scores and norms, every image counted once."""
    from scanner.runtime import runner as R

    ctx = ModelContext.open(zoo_path("resnet_badnets"))
    layers = ctx.select("all")
    biggest = max(l.channels * int(np.prod(l.spatial)) * 4 for l in layers)
    pixels = np.random.RandomState(2).randint(0, 256, (10, 28, 28, 1)).astype(np.uint8)
    whole = ctx.runner(layers, norms=("linf", "l1", "l2")).run(pixels, batch_size=10)
    monkeypatch.setattr(R, "TAP_BYTES", 3 * biggest)
    assert R.tap_batch(layers, 10) == 3 and R.tap_batch(layers, 2) == 2 and R.tap_batch([], 10) == 10
    runner = ctx.runner(layers, norms=("linf", "l1", "l2"))
    calls = _session_calls(monkeypatch, runner)
    split = runner.run(pixels, batch_size=10)
    assert calls == [3, 3, 3, 1] and runner.queries == 10
    np.testing.assert_allclose(split.scores, whole.scores, rtol=1e-5, atol=1e-6)
    for k in ("linf", "l1", "l2"):
        np.testing.assert_allclose(split.norms[k], whole.norms[k], rtol=1e-5, atol=1e-5)
    calls.clear()
    runner.run(pixels, batch_size=10, norms=False)  # no norms asked for: the batch as given
    assert calls == [10]


def test_cpu_session_calls_are_sized_by_the_largest_map(monkeypatch):
    """On CPU a batch whose largest map would fill more than CALL_BYTES runs as smaller session calls (at least
    CALL_MIN images each): the same scores, every image counted once."""
    from scanner.runtime import runner as R

    ctx = ModelContext.open(zoo_path("resnet_badnets"))
    assert ctx.map_bytes == max(l.channels * int(np.prod(l.spatial)) * 4 for l in ctx.layers if l.spatial)
    pixels = np.random.RandomState(3).randint(0, 256, (10, 28, 28, 1)).astype(np.uint8)
    whole = ctx.runner().run(pixels, batch_size=10)
    monkeypatch.setattr(R, "CALL_BYTES", 3 * ctx.map_bytes)
    assert R.call_images(ctx.map_bytes, 10) == R.CALL_MIN == 4 and R.call_images(None, 10) == 10
    monkeypatch.setattr(R, "CALL_BYTES", 5 * ctx.map_bytes)
    assert R.call_images(ctx.map_bytes, 10) == 5 and R.call_images(ctx.map_bytes, 3) == 3
    runner = ctx.runner()
    calls = _session_calls(monkeypatch, runner)
    split = runner.run(pixels, batch_size=10)
    assert calls == [5, 5] and runner.queries == 10
    np.testing.assert_allclose(split.scores, whole.scores, rtol=1e-5, atol=1e-6)


def _reshape_model():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(0)
    inits = [numpy_helper.from_array(rng.randn(4, 3, 3, 3).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
             numpy_helper.from_array(rng.randn(5, 64).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="/conv/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="/relu"),
             helper.make_node("Reshape", ["r", "shape"], ["f"], name="/flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="/fc/Gemm", transB=1)]
    graph = helper.make_graph(nodes, "reshape", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = graphs.IR_VERSION
    onnx.checker.check_model(model)
    return model


def test_integer_tensors_stay_in_the_graph(monkeypatch):
    monkeypatch.setattr(S, "DETACH_BYTES", 0)  # detach every weight, however small
    model = _reshape_model()  # its Reshape shape is an int64 initializer: shape inference and onnxruntime read it
    detached = S.detach(model)
    where = {t.name: t.data_location for t in detached.skeleton.graph.initializer}
    ints = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64]
    floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert ints and all(where[n] != onnx.TensorProto.EXTERNAL for n in ints)
    assert floats and all(where[n] == onnx.TensorProto.EXTERNAL for n in floats)
    x = graphs.inputs(model)
    np.testing.assert_array_equal(S.Session(model, device="cpu").run(x)["logits"], graphs.run(model, x)["logits"])
