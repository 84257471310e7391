"""In-graph norms equal numpy norms of the same activations; logits unchanged; masks and features."""

from pathlib import Path

import graphs
import numpy as np
import onnx
import pytest

from scanner.errors import ScannerError
from scanner.graph.instrument import KERNELS, NORMS, PREFIX, instrument
from scanner.graph.layers import discover, select

run = graphs.run

MODELS = Path(__file__).resolve().parents[1] / "models"


def numpy_norms(a, layer):
    """(linf, l1, l2) per image and channel, computed in float64 from the raw read tensor."""
    a = np.abs(a.astype(np.float64))
    if layer.rank == 2:
        return a, a, a
    n = a.shape[0]
    a = (
        a.reshape(n, layer.channels, -1)
        if layer.channel_axis == 1
        else np.moveaxis(a.reshape(n, -1, layer.channels), 1, 2)
    )
    return a.max(2), a.sum(2), np.sqrt((a * a).sum(2))


def check_norms(inst, out, atol=1e-6):
    for layer in inst.layers:
        lo, hi = inst.slices[layer.id]
        expected = numpy_norms(out[inst.taps[layer.id]], layer)
        for k, want in zip(NORMS, expected):
            got = out[inst.norm_outputs[k]][:, lo:hi]
            np.testing.assert_allclose(
                got, want, rtol=1e-5, atol=atol * max(1.0, np.abs(want).max()), err_msg=f"{layer.id} {k}"
            )


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("opset", graphs.OPSETS)
@pytest.mark.parametrize("name", sorted(graphs.ALL))
def test_norms_equal_numpy_all_layers(name, opset, kernels):
    model = graphs.ALL[name](opset=opset)
    layers = discover(model)
    inst = instrument(model, layers, expose=True, kernels=kernels)
    onnx.checker.check_model(inst.model, full_check=True)
    x = graphs.inputs(model, n=3)
    out = run(inst.model, x)
    check_norms(inst, out)
    ref = run(model, x)
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", ["N", 1])
def test_static_and_dynamic_batch(batch):
    model = graphs.conv_bn_relu(batch=batch)
    inst = instrument(model, discover(model), expose=True)
    x = graphs.inputs(model, n=2)
    out = run(inst.model, x)
    check_norms(inst, out)
    assert out[inst.norm_outputs["linf"]].shape == (x.shape[0], 8 + 16 + 10)


@pytest.mark.parametrize("spatial", [8, 12])
def test_dynamic_spatial_size(spatial):
    model = graphs.conv_relu(dynamic_spatial=True)
    inst = instrument(model, discover(model), expose=True)
    out = run(inst.model, graphs.inputs(model, n=2, spatial=spatial))
    check_norms(inst, out)


def test_outputs_layout_and_input_untouched():
    model = graphs.residual()
    before = model.SerializeToString()
    layers = discover(model)
    inst = instrument(model, layers)
    assert model.SerializeToString() == before
    outs = [o.name for o in inst.model.graph.output]
    assert outs[0] == "logits" and inst.model.graph.output[0] == model.graph.output[0]
    assert outs[1:] == [inst.norm_outputs[k] for k in NORMS]  # no tapped activation maps
    assert inst.slices == {l.id: s for l, s in zip(layers, [(0, 8), (8, 16), (16, 24), (24, 34)])}
    assert inst.columns == 34 and inst.taps == {} and inst.mask_inputs == {}
    assert inst.model.opset_import == model.opset_import
    x = graphs.inputs(model)
    np.testing.assert_allclose(run(inst.model, x)["logits"], run(model, x)["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["conv_bn_relu", "residual", "activations", "tokens"])
def test_post_activation_reads_leave_logits_bitwise_identical(name):
    model = graphs.ALL[name]()
    layers = [l for l in discover(model) if l.nonnegative]  # post-Relu reads: fusions untouched
    x = graphs.inputs(model)
    assert np.array_equal(run(instrument(model, layers).model, x)["logits"], run(model, x)["logits"])


def added_ops(inst):
    return [n.op_type for n in inst.model.graph.node if n.name.startswith(PREFIX + "/")]


def test_pooling_kernels_on_maps_and_no_lp_pool():
    model = graphs.conv_bn_relu(opset=20)
    inst = instrument(model, [l for l in discover(model) if l.op_type == "Conv"], kernels="pool")
    ops = set(added_ops(inst))
    assert {"GlobalMaxPool", "GlobalAveragePool"} <= ops
    assert not ops & {"GlobalLpPool", "ReduceMax", "ReduceSum", "ReduceL1", "ReduceL2", "Abs"}  # post-Relu maps
    assert len(inst.norm_outputs) == 3


@pytest.mark.parametrize("opset", graphs.OPSETS)
def test_reduce_kernels_make_no_full_size_map(opset):
    """The CPU formulation reduces each map in place: no Abs, no a*a, no pooling (NCHWc reorders aside)."""
    for model, signed in ((graphs.conv_bn_relu(opset=opset), False), (graphs.residual(opset=opset), True)):
        layers = [l for l in discover(model) if l.op_type == "Conv"]
        ops = added_ops(instrument(model, layers))
        assert not set(ops) & {"Abs", "Mul", "GlobalMaxPool", "GlobalAveragePool", "GlobalLpPool"}
        assert {"ReduceMax", "ReduceL2"} <= set(ops)
        assert ("ReduceL1" in ops and "ReduceMin" in ops) == signed
    tokens = graphs.tokens(opset=opset)  # channel-last token reads: the same forms over the tokens
    ops = added_ops(instrument(tokens, [l for l in discover(tokens) if l.rank == 3]))
    assert ops and not set(ops) & {"Abs", "Mul"} and "ReduceL2" in ops


def test_signed_maps_take_abs():
    model = graphs.residual()
    conv2 = [l for l in discover(model) if l.is_last_conv]
    inst = instrument(model, conv2, kernels="pool")
    assert any(n.op_type == "Abs" for n in inst.model.graph.node)


def test_each_layers_norms_run_right_after_its_map(tmp_path):
    """onnxruntime's default schedule computes a layer's norms before the next layer's conv, not all at the end
    (every map would stay alive until then: memory grows with the layers, and the norms read cold memory)."""
    from scanner.runtime.session import ort

    model = onnx.load(MODELS / "resnet_badnets.onnx")
    layers = [l for l in discover(model) if l.op_type == "Conv"]
    inst = instrument(model, layers)
    rt = ort()
    opts = rt.SessionOptions()
    opts.enable_profiling, opts.profile_file_prefix = True, str(tmp_path / "p")
    s = rt.InferenceSession(inst.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    s.run(None, {s.get_inputs()[0].name: np.zeros((2, 1, 28, 28), np.float32)})
    import json

    events = sorted((e for e in json.load(open(s.end_profiling())) if e.get("cat") == "Node"), key=lambda e: e["ts"])
    order = [(e["name"], e["args"]["op_name"]) for e in events if e["name"].endswith("_kernel_time")]
    first_norm = {}  # layer index -> position of its first norm node
    for i, (name, _) in enumerate(order):
        if name.startswith(PREFIX + "/L"):
            first_norm.setdefault(int(name.split("/")[1][1:]), i)
    convs = [i for i, (_, op) in enumerate(order) if op in ("Conv", "FusedConv")]
    assert len(first_norm) == len(layers) and len(convs) >= len(layers)
    for layer in layers[:-1]:  # before the conv that makes the next layer's map
        nxt = [i for i in convs if i > first_norm[layer.index]]
        assert nxt, f"layer {layer.index}'s norms ran after every conv"
    assert sorted(first_norm.values()) == [first_norm[l.index] for l in sorted(layers, key=lambda l: l.index)]


def test_norm_subset_and_empty_layers():
    model = graphs.conv_relu()
    inst = instrument(model, select(discover(model), "last"), norms=("linf",))
    assert list(inst.norm_outputs) == ["linf"]
    out = run(inst.model, graphs.inputs(model))
    assert out[inst.norm_outputs["linf"]].shape == (4, 12)
    inst = instrument(model, [], features=[model.graph.node[-3].output[0]])
    assert inst.norm_outputs == {} and len(inst.model.graph.output) == 2
    with pytest.raises(ScannerError):
        instrument(model, [], norms=("l3",))


def test_masks_all_ones_identical_and_zero_channel_reads_zero():
    model = graphs.conv_bn_relu()
    layers = discover(model)
    inst = instrument(model, layers, masks=True, expose=True)
    onnx.checker.check_model(inst.model, full_check=True)
    assert set(inst.mask_inputs) == {l.id for l in layers}
    x = graphs.inputs(model)
    ref = run(model, x)["logits"]
    ones = {inst.mask_inputs[l.id]: np.ones(l.channels, np.float32) for l in layers}
    out = run(inst.model, x, **ones)
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-6, atol=1e-7)
    check_norms(inst, out)
    conv1, conv2, fc = layers
    feeds = dict(ones)
    feeds[inst.mask_inputs[conv1.id]] = np.ones(8, np.float32) * (np.arange(8) != 3)
    feeds[inst.mask_inputs[fc.id]] = np.ones(10, np.float32) * (np.arange(10) != 7)
    out = run(inst.model, x, **feeds)
    assert np.all(out[inst.taps[conv1.id]][:, 3] == 0) and np.any(out[inst.taps[conv1.id]][:, 2] != 0)
    assert np.all(out["logits"][:, 7] == 0)
    lo, _ = inst.slices[conv1.id]
    for k in NORMS:
        assert np.all(out[inst.norm_outputs[k]][:, lo + 3] == 0)
    check_norms(inst, out)
    assert not np.allclose(out["logits"][:, :7], ref[:, :7])  # downstream sees the masked map


def test_masks_without_norms_keep_model_lean():
    model = graphs.tokens()
    layers = discover(model)
    inst = instrument(model, layers, norms=False, masks=True)
    assert inst.norm_outputs == {} and [o.name for o in inst.model.graph.output] == ["logits"]
    x = graphs.inputs(model)
    feeds = {inst.mask_inputs[l.id]: np.ones(l.channels, np.float32) for l in layers}
    np.testing.assert_allclose(run(inst.model, x, **feeds)["logits"], run(model, x)["logits"], rtol=1e-6, atol=1e-7)


def test_features_expose_head_input():
    model = graphs.conv_bn_relu()
    head = [l for l in discover(model) if l.is_head][0]
    inst = instrument(model, [], norms=False, features=[head.input])
    out = run(inst.model, graphs.inputs(model))
    assert out[inst.features[head.input]].shape == (4, 16)
    with pytest.raises(ScannerError, match="not found"):
        instrument(model, [], features=["no_such_tensor"])


def test_instrumenting_twice_keeps_names_unique():
    model = graphs.conv_relu()
    first = instrument(model, discover(model), masks=True)
    second = instrument(first.model, discover(model), masks=True)
    onnx.checker.check_model(second.model, full_check=True)
    assert set(second.norm_outputs.values()).isdisjoint(first.norm_outputs.values())
    assert set(second.mask_inputs.values()).isdisjoint(first.mask_inputs.values())


def test_stale_layer_refused():
    layers = discover(graphs.conv_relu())
    with pytest.raises(ScannerError, match="rediscover"):
        instrument(graphs.mlp(), layers)


# Zoo models (produced separately; skipped when absent).
ZOO = sorted(MODELS.glob("*.onnx"))


@pytest.mark.skipif(not ZOO, reason="no zoo models in models/")
@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.name)
def test_zoo_norms_equal_numpy_all_layers(path):
    model = onnx.load(str(path))
    layers = discover(model)
    assert layers
    inst = instrument(model, layers, expose=True)
    onnx.checker.check_model(inst.model)
    x = graphs.inputs(model, n=4)
    out = run(inst.model, x)
    check_norms(inst, out)
    plain = run(model, x)
    name = model.graph.output[0].name
    np.testing.assert_allclose(out[name], plain[name], rtol=1e-5, atol=1e-5)
    lean = run(instrument(model, layers).model, x)
    np.testing.assert_allclose(lean[name], plain[name], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ZOO, reason="no zoo models in models/")
@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.name)
def test_zoo_masks_all_ones_identical(path):
    model = onnx.load(str(path))
    layers = discover(model)
    inst = instrument(model, layers, masks=True)
    x = graphs.inputs(model, n=4)
    feeds = {inst.mask_inputs[l.id]: np.ones(l.channels, np.float32) for l in layers}
    name = model.graph.output[0].name
    np.testing.assert_allclose(run(inst.model, x, **feeds)[name], run(model, x)[name], rtol=1e-5, atol=1e-6)
