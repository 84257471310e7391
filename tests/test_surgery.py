"""Pruning makes channels read exactly 0; shared and Constant weights; metadata; linear layer rewrite; tails."""

import json
from pathlib import Path

import graphs
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner.errors import ScannerError
from scanner.graph.instrument import instrument
from scanner.graph.layers import discover, find_weight
from scanner.graph.surgery import linear_weights, prune, record, set_linear, tail

MODELS = Path(__file__).resolve().parents[1] / "models"
run = graphs.run
PRUNABLE = ["conv_bn_relu", "conv_relu", "grouped", "residual", "mlp", "matmul_add", "tokens", "activations"]
PRUNABLE += ["shared_weight", "constant_weight", "unnamed", "conv1d"]


def reads(model, layers, x):
    """{layer id: read tensor} on input ``x``."""
    inst = instrument(model, layers, norms=False, expose=True)
    out = run(inst.model, x)
    return {l.id: out[inst.taps[l.id]] for l in layers}, out


def channel(a, layer, ks):
    return np.take(a, ks, axis=layer.channel_axis)


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def op_types(model):
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("opset", [13, 20])
@pytest.mark.parametrize("name", PRUNABLE)
def test_pruned_channels_read_exactly_zero(name, opset):
    model = graphs.ALL[name](opset=opset)
    layers = [l for l in discover(model) if l.zero_preserving]
    x = graphs.inputs(model, n=5) * 3
    before, _ = reads(model, layers, x)
    for layer in layers:
        ks = sorted({0, layer.channels - 1, layer.channels // 2})
        pruned = prune(model, {layer.id: ks}, layers)
        onnx.checker.check_model(pruned, full_check=True)
        assert op_types(pruned) == op_types(model)
        after, _ = reads(pruned, [layer], x)
        assert np.all(channel(after[layer.id], layer, ks) == 0), layer.id
        keep = [k for k in range(layer.channels) if k not in ks]
        np.testing.assert_allclose(
            channel(after[layer.id], layer, keep), channel(before[layer.id], layer, keep), rtol=1e-5, atol=1e-6
        )


def test_unfused_bn_needs_its_own_zeros():
    model = graphs.residual()
    conv2 = [l for l in discover(model) if l.is_last_conv][0]
    assert conv2.chain == ("Conv", "BatchNormalization")
    pruned = prune(model, {conv2.id: [1, 4]}, discover(model))
    bn = node(pruned, conv2.chain_nodes[1])
    scale, _ = find_weight(pruned, bn.input[1])
    bias, _ = find_weight(pruned, bn.input[2])
    assert scale[1] == scale[4] == bias[1] == bias[4] == 0 and np.all(scale[[0, 2, 3]] != 0)
    after, _ = reads(pruned, [conv2], graphs.inputs(model))
    assert np.all(after[conv2.id][:, [1, 4]] == 0)


def test_shared_weight_copied_for_the_pruned_consumer_only():
    model = graphs.shared_weight()
    layers = {l.node: l for l in discover(model)}
    a, b = layers["/a/Conv"], layers["/b/Conv"]
    shared = node(model, "/a/Conv").input[1]
    original, _ = find_weight(model, shared)
    pruned = prune(model, {a.id: [2]}, list(layers.values()))
    na, nb = node(pruned, "/a/Conv"), node(pruned, "/b/Conv")
    assert nb.input[1] == shared and na.input[1] != shared
    np.testing.assert_array_equal(find_weight(pruned, shared)[0], original)
    wa, _ = find_weight(pruned, na.input[1])
    assert np.all(wa[2] == 0) and np.array_equal(np.delete(wa, 2, 0), np.delete(original, 2, 0))
    x = graphs.inputs(model)
    after, _ = reads(pruned, [a, b], x)
    assert np.all(after[a.id][:, 2] == 0)
    both = prune(pruned, {b.id: [5]}, list(layers.values()))  # b is now the only user: edited in place
    assert node(both, "/b/Conv").input[1] == shared and len(both.graph.initializer) == len(pruned.graph.initializer)
    assert np.all(find_weight(both, shared)[0][5] == 0) and np.all(find_weight(both, na.input[1])[0][5] != 0)


def test_constant_node_weights():
    model = graphs.constant_weight()
    conv, fc = discover(model)
    pruned = prune(model, {conv.id: [0, 5], fc.id: [3]}, [conv, fc])
    assert len(pruned.graph.initializer) == len(model.graph.initializer) + 1  # the Identity-fed Gemm weight
    w, where = find_weight(pruned, node(pruned, "/conv1/Conv").input[1])
    assert where == "constant" and np.all(w[[0, 5]] == 0)
    onnx.checker.check_model(pruned, full_check=True)
    after, out = reads(pruned, [conv, fc], graphs.inputs(model))
    assert np.all(after[conv.id][:, [0, 5]] == 0) and np.all(out["logits"][:, 3] == 0)


@pytest.mark.parametrize("plan", [{}, "empty-lists"])
def test_empty_plan_bitwise_identical(plan):
    model = graphs.conv_bn_relu()
    layers = discover(model)
    plan = {l.id: [] for l in layers} if plan == "empty-lists" else plan
    pruned = prune(model, plan, layers)
    assert pruned.SerializeToString() == model.SerializeToString()
    x = graphs.inputs(model)
    assert np.array_equal(run(pruned, x)["logits"], run(model, x)["logits"])


def test_metadata_and_names_survive_and_input_untouched():
    model = graphs.with_metadata(graphs.conv_bn_relu())
    before = model.SerializeToString()
    layers = discover(model)
    pruned = prune(model, {l.id: [1] for l in layers}, layers)
    assert model.SerializeToString() == before
    for field in ("doc_string", "model_version", "producer_name", "producer_version", "ir_version"):
        assert getattr(pruned, field) == getattr(model, field), field
    assert pruned.metadata_props == model.metadata_props and pruned.opset_import == model.opset_import
    assert pruned.graph.doc_string == model.graph.doc_string
    for a, b in zip(pruned.graph.node, model.graph.node):
        assert (a.name, a.doc_string, list(a.metadata_props)) == (b.name, b.doc_string, list(b.metadata_props))
    assert [o for o in pruned.graph.output] == [o for o in model.graph.output]
    assert [i for i in pruned.graph.input] == [i for i in model.graph.input]


@pytest.mark.parametrize("builder,activation", [(graphs.sigmoid_conv, "Sigmoid"), (graphs.activations, "HardSigmoid")])
def test_non_zero_preserving_refused(builder, activation):
    model = builder()
    layers = discover(model)
    layer = [l for l in layers if not l.zero_preserving][0]
    with pytest.raises(ScannerError, match=activation) as err:
        prune(model, {layer.id: [0]}, layers)
    assert layer.id in str(err.value)


def test_bad_plans():
    model = graphs.conv_relu()
    layers = discover(model)
    with pytest.raises(ScannerError, match="unknown layer"):
        prune(model, {"nope:x": [0]}, layers)
    with pytest.raises(ScannerError, match="out of range"):
        prune(model, {layers[0].id: [8]}, layers)
    with pytest.raises(ScannerError, match="out of range"):
        prune(model, {layers[0].id: [-1]}, layers)
    with pytest.raises(ScannerError, match="rediscover"):
        prune(graphs.conv_bn_relu(), {layers[0].id: [0]}, layers)


def linear_layers():
    out = []
    for name in ("mlp", "matmul_add", "tokens", "conv_bn_relu", "constant_weight"):
        model = graphs.ALL[name]()
        out += [(name, model, l) for l in discover(model) if l.op_type in ("Gemm", "MatMul")]
    return out


@pytest.mark.parametrize("name,model,layer", linear_layers(), ids=lambda v: v if isinstance(v, str) else "")
def test_set_linear_round_trip(name, model, layer):
    w, b = linear_weights(model, layer)
    assert w.shape[0] == layer.channels and b.shape == (layer.channels,)
    rng = np.random.default_rng(0)
    w2 = rng.standard_normal(w.shape).astype(np.float32)
    b2 = rng.standard_normal(b.shape).astype(np.float32)
    edited = set_linear(model, layer, w2, b2)
    onnx.checker.check_model(edited, full_check=True)
    w3, b3 = linear_weights(edited, discover(edited)[layer.index])
    np.testing.assert_allclose(w3, w2, rtol=1e-6)
    np.testing.assert_allclose(b3, b2, rtol=1e-6)
    same = set_linear(model, layer, w, b)
    x = graphs.inputs(model)
    np.testing.assert_allclose(run(same, x)["logits"], run(model, x)["logits"], rtol=1e-5, atol=1e-6)
    if layer.is_head:
        assert op_types(edited) == op_types(model)
        feats = run(instrument(model, [], norms=False, features=[layer.input]).model, x)[layer.input]
        logits = feats.reshape(len(x), -1) @ w2.T.astype(np.float64) + b2
        if name == "matmul_add":  # Softmax after the head
            logits = np.exp(logits - logits.max(1, keepdims=True))
            logits /= logits.sum(1, keepdims=True)
        np.testing.assert_allclose(run(edited, x)["logits"], logits, rtol=1e-4, atol=1e-5)


def test_set_linear_gemm_without_c_gets_c_and_alpha_beta_respected():
    net = graphs.Net([6], 17, 0, "N", "alpha")
    model = net.build(net.gemm("x", 6, 4, trans_b=0, bias=False, name="/fc/Gemm", alpha=2.0))
    (fc,) = discover(model)
    w, b = linear_weights(model, fc)
    assert np.all(b == 0)
    np.testing.assert_allclose(w, 2.0 * onnx.numpy_helper.to_array(model.graph.initializer[0]).T)
    assert len(set_linear(model, fc, w, b).graph.node[0].input) == 2  # zero bias: no C added
    b2 = np.arange(4, dtype=np.float32)
    edited = set_linear(model, fc, w, b2)
    assert len(edited.graph.node[0].input) == 3 and op_types(edited) == op_types(model)
    x = graphs.inputs(model)
    np.testing.assert_allclose(run(edited, x)["logits"], run(model, x)["logits"] + b2, rtol=1e-5, atol=1e-6)


def test_set_linear_matmul_without_add_inserts_bias():
    net = graphs.Net([6], 17, 0, "N", "mm")
    model = net.build(net.matmul("x", 6, 4, bias=False, name="/fc/MatMul"))
    (fc,) = discover(model)
    w, _ = linear_weights(model, fc)
    edited = set_linear(model, fc, w, np.ones(4, np.float32))
    onnx.checker.check_model(edited, full_check=True)
    x = graphs.inputs(model)
    np.testing.assert_allclose(run(edited, x)["logits"], run(model, x)["logits"] + 1, rtol=1e-5, atol=1e-6)
    with pytest.raises(ScannerError, match="expected weight"):
        set_linear(model, fc, w.T, np.ones(4))
    grouped = graphs.grouped()
    with pytest.raises(ScannerError, match="not a Gemm"):
        set_linear(grouped, [l for l in discover(grouped) if l.op_type == "ConvTranspose"][0], w, np.ones(4))


def test_set_linear_conv_layer_scales_its_relu():
    """A feature Conv (not only a head) is rewritten in its own layout: twice its weights and bias give twice
    its ReLU's output, and the scores of a model whose head reads it through a pooling, twice the logits
    minus the bias."""
    model = graphs.conv_relu()
    conv = [l for l in discover(model) if l.op_type == "Conv"][-1]
    w, b = linear_weights(model, conv)
    assert w.shape == (12, 8 * 3 * 3)
    edited = set_linear(model, conv, 2 * w, 2 * b)
    onnx.checker.check_model(edited, full_check=True)
    x = graphs.inputs(model)
    head = [l for l in discover(model) if l.is_head][0]
    _, hb = linear_weights(model, head)
    np.testing.assert_allclose(run(edited, x)["logits"], 2 * run(model, x)["logits"] - hb, rtol=1e-4, atol=1e-4)


def test_record_sets_and_overwrites():
    model = graphs.with_metadata(graphs.conv_relu())
    out = record(model, {"scanner.prune": {"layers": ["a"], "channels": [1, 2]}, "author": "scanner"})
    props = {p.key: p.value for p in out.metadata_props}
    assert json.loads(props["scanner.prune"]) == {"channels": [1, 2], "layers": ["a"]}
    assert props["author"] == "scanner" and props["scanner.zoo"] == '{"k": 1}'
    assert {p.key: p.value for p in model.metadata_props}["author"] == "tests"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(["conv_bn_relu", "residual", "grouped", "mlp", "tokens", "shared_weight"]))
def test_random_prune_plans(data, name):
    model = graphs.ALL[name]()
    layers = [l for l in discover(model) if l.zero_preserving]
    plan = {}
    for l in layers:
        ks = data.draw(st.lists(st.integers(0, l.channels - 1), max_size=l.channels, unique=True), label=l.id)
        if ks:
            plan[l.id] = ks
    pruned = prune(model, plan, layers)
    onnx.checker.check_model(pruned, full_check=True)
    x = graphs.inputs(model, n=3, seed=data.draw(st.integers(0, 100), label="seed")) * 2
    after, _ = reads(pruned, layers, x)
    before, _ = reads(model, layers, x)
    first = min((l.index for l in layers if l.id in plan), default=len(layers) + 99)
    for l in layers:
        if l.id in plan:
            assert np.all(channel(after[l.id], l, plan[l.id]) == 0), l.id
        if l.index < first:  # upstream of every pruned layer: untouched
            assert np.array_equal(after[l.id], before[l.id]), l.id


# Zoo models (produced separately; skipped when absent).
ZOO = sorted(MODELS.glob("*.onnx"))


@pytest.mark.skipif(not ZOO, reason="no zoo models in models/")
@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.name)
def test_zoo_prune_last_conv_reads_zero(path):
    model = onnx.load(str(path))
    layers = discover(model)
    x = graphs.inputs(model, n=4)
    assert np.array_equal(
        run(prune(model, {}, layers), x)[model.graph.output[0].name], run(model, x)[model.graph.output[0].name]
    )
    for layer in [l for l in layers if l.zero_preserving and not l.is_head]:
        ks = list(range(0, layer.channels, 3))
        pruned = prune(model, {layer.id: ks}, layers)
        onnx.checker.check_model(pruned)
        after, _ = reads(pruned, [layer], x)
        assert np.all(channel(after[layer.id], layer, ks) == 0), layer.id


@pytest.mark.skipif(not (MODELS / "cnn_badnets_bnunfused.onnx").exists(), reason="unfused-BN zoo model absent")
def test_zoo_unfused_bn_model_prunes_to_exact_zeros():
    model = onnx.load(str(MODELS / "cnn_badnets_bnunfused.onnx"))
    layers = discover(model)
    bn_layers = [l for l in layers if "BatchNormalization" in l.chain]
    assert bn_layers
    x = graphs.inputs(model, n=8)
    plan = {l.id: list(range(l.channels // 2)) for l in bn_layers}
    after, _ = reads(prune(model, plan, layers), bn_layers, x)
    for l in bn_layers:
        assert np.all(channel(after[l.id], l, plan[l.id]) == 0), l.id


@pytest.mark.skipif(not ZOO, reason="no zoo models in models/")
@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.name)
def test_zoo_head_round_trip(path):
    model = onnx.load(str(path))
    head = [l for l in discover(model) if l.is_head][0]
    w, b = linear_weights(model, head)
    edited = set_linear(model, head, w, b)
    assert op_types(edited) == op_types(model)
    x = graphs.inputs(model, n=4)
    name = model.graph.output[0].name
    np.testing.assert_allclose(run(edited, x)[name], run(model, x)[name], rtol=1e-5, atol=1e-6)


def test_gemm_with_bias_add_after_it():
    net = graphs.Net([6], 17, 0, "N", "gemm_add")
    y = net.gemm("x", 6, 4, trans_b=1, bias=False, name="/fc/Gemm")
    model = net.build(net.node("Add", [y, net.weight(np.arange(4, dtype=np.float32))]))
    (fc,) = discover(model)
    assert fc.chain == ("Gemm", "Add")
    w, b = linear_weights(model, fc)
    assert np.array_equal(b, np.arange(4))
    edited = set_linear(model, fc, w, b + 1)
    assert op_types(edited) == op_types(model) and len(edited.graph.node[0].input) == 2
    x = graphs.inputs(model)
    np.testing.assert_allclose(run(edited, x)["logits"], run(model, x)["logits"] + 1, rtol=1e-5, atol=1e-6)
    after, out = reads(prune(model, {fc.id: [2]}, [fc]), [fc], x)
    assert np.all(out["logits"][:, 2] == 0)


@pytest.mark.parametrize("name", ["conv_relu", "residual", "tokens", "conv_bn_relu"])
def test_clip_bounds_every_read(name):
    from scanner.graph.surgery import CLIP_SUFFIX, clip

    model = graphs.ALL[name](opset=17)
    before = model.SerializeToString()
    layers = [l for l in discover(model) if not l.is_head and l.zero_preserving]
    x = graphs.inputs(model, n=5) * 3
    scores = model.graph.output[0].name
    inf = {l.id: (None if l.nonnegative else np.full(l.channels, -np.inf, np.float32),
                  np.full(l.channels, np.inf, np.float32)) for l in layers}
    loose = clip(model, layers, inf)
    onnx.checker.check_model(loose, full_check=True)
    added = [n for n in loose.graph.node if n.name.endswith(CLIP_SUFFIX)]
    assert {n.op_type for n in added} <= {"Min", "Max"}
    assert len(added) == sum(1 if l.nonnegative else 2 for l in layers)
    assert sorted(op_types(model)) == sorted(n.op_type for n in loose.graph.node if n not in added)
    # Unbounded: the same scores (up to the fusions onnxruntime can no longer make across a bound).
    np.testing.assert_allclose(run(loose, x)[scores], run(model, x)[scores], rtol=1e-5, atol=1e-6)
    # Bounds of 0 make every read 0, which is what pruning all its channels does: the same scores.
    zero = {l.id: (None if l.nonnegative else np.zeros(l.channels, np.float32), np.zeros(l.channels, np.float32))
            for l in layers}
    pruned = prune(model, {l.id: list(range(l.channels)) for l in layers}, layers)
    np.testing.assert_allclose(run(clip(model, layers, zero), x)[scores], run(pruned, x)[scores], rtol=1e-5, atol=1e-6)
    assert model.SerializeToString() == before  # the input model is never changed


def _with_outputs(model, names):
    """A copy of ``model`` that also outputs the tensors ``names``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return m


def _tail_matches(model, layer, x, scores="logits"):
    """The tail of ``model`` from ``layer`` on, fed the tensors the whole model computes before it, gives the
    whole model's scores on ``x``; returns the tail's inputs."""
    t, cut = tail(model, layer.node, scores)
    onnx.checker.check_model(t)
    assert [i.name for i in t.graph.input] == cut and model.graph.input[0].name not in cut
    whole = run(_with_outputs(model, cut), x)
    sess = graphs.session(t)
    got = sess.run([scores], {c: whole[c] for c in cut})[0]
    np.testing.assert_allclose(got, whole[scores], rtol=1e-5, atol=1e-6)
    return cut


def test_tail_takes_the_skip_of_a_residual_join_and_computes_shapes_itself():
    """The network after a block's second conv reads that conv's input and the block's skip; a Reshape whose shape
    comes from a Shape of an earlier tensor gets that Shape in the tail (its dims are no image tensor); unnamed nodes
    keep the names the layers know them by; the first layer has no tail (it would need the graph input)."""
    model = graphs.residual()
    layers = {l.id.split(":")[0]: l for l in discover(model)}
    x = graphs.inputs(model, n=3)
    cut = _tail_matches(model, layers["/block/conv2/Conv"], x)
    assert len(cut) == 2  # conv2's input and the skip from the stem
    with pytest.raises(ScannerError, match="graph input"):
        tail(model, layers["/stem/Conv"].node, "logits")

    net = graphs.Net([3, 6, 6], 17, 5, "N", "reshaped")
    stem = net.relu(net.conv("x", 3, 4, name="/stem/Conv"))
    dims = net.node("Shape", [stem])
    index, rest = "tail_index", "tail_rest"
    net.inits += [onnx.numpy_helper.from_array(np.array([0], np.int64), index),
                  onnx.numpy_helper.from_array(np.array([-1], np.int64), rest)]
    shape = net.node("Concat", [net.node("Gather", [dims, index], axis=0), rest], axis=0)
    y = net.relu(net.conv(stem, 4, 5, name="/conv2/Conv"))
    model = net.build(net.head(net.node("Reshape", [y, shape]), 5 * 6 * 6, 3))
    for n in model.graph.node:
        n.name = ""
    layer = [l for l in discover(model) if l.op_type == "Conv"][-1]
    t, _ = tail(model, layer.node, "logits")
    assert {"Shape", "Gather", "Concat"} <= {n.op_type for n in t.graph.node}
    assert layer.node in {n.name for n in t.graph.node}
    assert _tail_matches(model, layer, x[:, :, :6, :6]) == [stem]
    edited = set_linear(t, layer, *linear_weights(model, layer))  # the layer's weights are editable in the tail
    assert op_types(edited) == op_types(t)


@pytest.mark.skipif(not ZOO, reason="no zoo models in models/")
@pytest.mark.parametrize("name", ["cnn_badnets_legacy", "rgb/rgb10_preact_wanet", "rgb/rgb10_mobilenetv2_blend",
                                  "rgb/rgb10_vit_badnets"])
def test_zoo_tails_give_the_whole_models_scores(name):
    """On exported zoo models (a legacy CNN, a pre-activation ResNet with shortcut convs, MobileNetV2's inverted
    residuals, a ViT's token stream), the tail from each of the feature refit's sites on gives the scores of the whole
    model from the tensors the whole model computed before it."""
    from scanner.context import ModelContext
    from scanner.repair.feature import site_layers

    ctx = ModelContext.open(MODELS / f"{name}.onnx", device="cpu", threads=2)
    x = graphs.inputs(ctx.proto, n=2, spatial=32)
    tails = 0
    for layer in site_layers(ctx):
        try:
            _tail_matches(ctx.proto, layer, x, ctx.scores)
            tails += 1
        except ScannerError as exc:
            assert "graph input" in str(exc), exc
    assert tails >= 2
