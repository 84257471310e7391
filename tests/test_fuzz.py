"""Short seeded fuzz runs (hypothesis, derandomized): the model loader on mutated zoo files, layer discovery
and instrumentation on random graphs, surgery with random plans. The long run is fuzz/fuzz_loader.py."""

from pathlib import Path

import graphs
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzing import BYTE_OPS, PROTO_EDITS, check_loader, mutate_bytes, proto_edit, random_graph
from scanner.graph.instrument import NORMS, instrument
from scanner.graph.layers import discover
from scanner.graph.surgery import prune

MODELS = Path(__file__).resolve().parents[1] / "models"
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

byte_op = st.tuples(st.sampled_from(BYTE_OPS), st.floats(0, 1), st.integers(0, 2**16))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Serialized seed models: a small hand-built CNN (structure dominates its bytes) and the zoo model."""
    out = {"small": graphs.conv_relu(opset=17, size=8).SerializeToString()}
    zoo = MODELS / "cnn_clean.onnx"
    if zoo.exists():
        out["zoo"] = zoo.read_bytes()
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "w.bin").write_bytes(b"\0" * 4096)  # a real file for external-data edits to find
    return d


@FUZZ
@given(data=st.data(), ops=st.lists(byte_op, min_size=1, max_size=4))
def test_loader_on_mutated_bytes(seeds, folder, data, ops):
    seed = data.draw(st.sampled_from(sorted(seeds)))
    path = folder / "m.onnx"
    path.write_bytes(mutate_bytes(seeds[seed], ops))
    check_loader(path, run=seed == "small")


@FUZZ
@given(edit=st.sampled_from(PROTO_EDITS), value=st.integers(0, 2**20), seed=st.integers(0, 2**16), zoo=st.booleans())
def test_loader_on_protobuf_edits(seeds, folder, edit, value, seed, zoo):
    base = onnx.ModelProto.FromString(seeds["zoo" if zoo and "zoo" in seeds else "small"])
    model = proto_edit(base, edit, value, np.random.default_rng(seed))
    path = folder / "e.onnx"
    try:
        data = model.SerializeToString()
    except Exception:  # noqa: BLE001 - an edit protobuf itself cannot encode: nothing to load
        return
    path.write_bytes(data)
    check_loader(path)


def _graph(data):
    return random_graph(lambda lo, hi: data.draw(st.integers(lo, hi)), lambda: data.draw(st.booleans()),
                        opset=data.draw(st.sampled_from([13, 17, 20])))


@FUZZ
@given(data=st.data())
def test_discovery_and_norms_on_random_graphs(data):
    model = _graph(data)
    layers = discover(model)
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(layers) == len(convs)
    for layer in layers:
        assert layer.channels >= 1 and layer.read
    inst = instrument(model, layers)
    x = graphs.inputs(model, n=3)
    out = graphs.run(inst.model, x)
    total = sum(l.channels for l in layers)
    for k in NORMS:
        norm = out[inst.norm_outputs[k]]
        assert norm.shape == (3, total) and np.all(np.isfinite(norm)) and np.all(norm >= 0)
    # instrumenting adds outputs only; logits agree up to float rounding (a tapped pre-activation tensor
    # stops onnxruntime from fusing Conv+BN, which moves the last bit)
    np.testing.assert_allclose(out["logits"], graphs.run(model, x)["logits"], rtol=1e-5, atol=1e-6)


def _reads(model, layers, x):
    inst = instrument(model, layers, norms=False, expose=True)
    out = graphs.run(inst.model, x)
    return {l.id: out[inst.taps[l.id]] for l in layers}


@FUZZ
@given(data=st.data())
def test_random_prune_plans_on_random_graphs(data):
    model = _graph(data)
    layers = discover(model)
    prunable = [l for l in layers if l.zero_preserving]
    if not prunable:
        return
    chosen = data.draw(st.lists(st.sampled_from(prunable), min_size=1, max_size=3, unique_by=lambda l: l.id))
    plan = {l.id: data.draw(st.lists(st.integers(0, l.channels - 1), min_size=1, max_size=l.channels, unique=True))
            for l in chosen}
    x = graphs.inputs(model, n=3) * 2
    before = _reads(model, layers, x)
    pruned = prune(model, plan, layers)
    onnx.checker.check_model(pruned, full_check=True)
    assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in model.graph.node]
    assert [i.name for i in pruned.graph.input] == [i.name for i in model.graph.input]
    after = _reads(pruned, layers, x)
    for layer in chosen:
        assert np.all(np.take(after[layer.id], plan[layer.id], axis=layer.channel_axis) == 0), layer.id
    first = min(l.index for l in chosen)
    for layer in layers:
        if layer.index < first:  # upstream of every edit: untouched
            np.testing.assert_array_equal(after[layer.id], before[layer.id])
        elif layer.index == first:  # the first pruned layer: its other channels unchanged
            lid = layer.id
            keep = [k for k in range(layer.channels) if k not in plan.get(lid, ())]
            np.testing.assert_allclose(np.take(after[lid], keep, axis=layer.channel_axis),
                                       np.take(before[lid], keep, axis=layer.channel_axis), rtol=1e-5, atol=1e-6)
    assert prune(model, {}, layers).SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("path", sorted((MODELS.parent / "fuzz" / "crashes").glob("*.onnx")), ids=lambda p: p.name)
def test_inputs_that_once_crashed_are_refused(path):
    """Files the long fuzz runs found (fuzz/README.md) stay handled: a ScannerError, nothing else."""
    assert check_loader(path) in ("refused", "loaded", "ran")
