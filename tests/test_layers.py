"""Layer discovery and selection on hand-built graphs."""

import graphs
import numpy as np
import onnx
import pytest

from scanner.errors import NothingToAnalyse, ScannerError
from scanner.graph.layers import discover, find_weight, select


def by_node(layers):
    return {l.node: l for l in layers}


def producer(model, tensor):
    return next(n for n in model.graph.node if tensor in n.output)


def test_conv_bn_relu_chain_and_roles():
    model = graphs.conv_bn_relu()
    layers = discover(model)
    assert [l.op_type for l in layers] == ["Conv", "Conv", "Gemm"]
    c1, c2, fc = layers
    assert c1.chain == ("Conv", "BatchNormalization", "Relu")
    assert producer(model, c1.read).op_type == "Relu"
    assert c1.output == producer(model, c1.output).output[0] and producer(model, c1.output).name == "/conv1/Conv"
    assert c1.id == f"/conv1/Conv:{c1.output}"
    assert (c1.channels, c1.channel_axis, c1.rank, c1.spatial) == (8, 1, 4, (16, 16))
    assert (c2.channels, c2.spatial) == (16, (8, 8))
    assert c1.nonnegative and c1.zero_preserving
    assert c2.is_last_conv and not c1.is_last_conv and not fc.is_last_conv
    assert fc.is_head and not c2.is_head
    assert (fc.channels, fc.rank, fc.read, fc.chain) == (10, 2, fc.output, ("Gemm",))
    assert [l.index for l in layers] == [0, 1, 2]
    assert len(c1.chain_nodes) == 3 and c1.chain_nodes[0] == "/conv1/Conv"


def test_original_proto_untouched():
    model = graphs.conv_bn_relu()
    before = model.SerializeToString()
    discover(model)
    assert model.SerializeToString() == before


def test_residual_stops_at_bn():
    layers = by_node(discover(graphs.residual()))
    conv2 = layers["/block/conv2/Conv"]
    assert conv2.chain == ("Conv", "BatchNormalization")
    assert not conv2.nonnegative and conv2.zero_preserving
    assert conv2.is_last_conv
    stem = layers["/stem/Conv"]  # its Relu output feeds the block and the skip: read there, chain ends
    assert stem.chain == ("Conv", "Relu")


def test_grouped_depthwise_and_conv_transpose():
    layers = by_node(discover(graphs.grouped()))
    assert layers["/grouped/Conv"].channels == 8
    assert layers["/depthwise/Conv"].channels == 8
    up = layers["/up/ConvTranspose"]
    assert (up.channels, up.spatial, up.chain) == (6, (16, 16), ("ConvTranspose", "Relu"))
    up2 = layers["/up2/ConvTranspose"]
    assert up2.is_last_conv and not up2.nonnegative and up2.spatial == (32, 32)


def test_gemm_channels_by_trans_b():
    layers = by_node(discover(graphs.mlp()))
    assert layers["/fc1/Gemm"].channels == 24 and layers["/fc1/Gemm"].chain == ("Gemm", "Relu")
    assert layers["/fc2/Gemm"].channels == 16 and not layers["/fc2/Gemm"].nonnegative  # LeakyRelu
    assert layers["/fc/Gemm"].channels == 10 and layers["/fc/Gemm"].is_head
    assert not any(l.is_last_conv for l in layers.values())


def test_matmul_add_chain_and_head_through_softmax():
    fc1, fc = discover(graphs.matmul_add())
    assert fc1.chain == ("MatMul", "Add", "Relu") and fc1.channels == 16 and fc1.nonnegative
    assert fc.chain == ("MatMul", "Add") and fc.is_head and fc.rank == 2


def test_token_matmul():
    t1, t2, fc = discover(graphs.tokens(t=5))
    assert (t1.rank, t1.channel_axis, t1.spatial, t1.channels) == (3, 2, (5,), 16)
    assert t2.chain == ("MatMul", "Add") and not t2.nonnegative and not t2.is_head
    assert fc.is_head


def test_activation_facts():
    layers = by_node(discover(graphs.activations(opset=20)))
    facts = {n.split("/")[1]: (l.chain[1:], l.nonnegative, l.zero_preserving) for n, l in layers.items() if "Conv" in n}
    assert facts == {
        "c_clip": (("Clip",), True, True),
        "c_silu": (("Sigmoid", "Mul"), False, True),
        "c_hswish": (("HardSwish",), False, True),
        "c_gelu": (("Gelu",), False, True),
        "c_tanh": (("Tanh",), False, True),
        "c_elu": (("Elu",), False, True),
        "c_hsig": (("HardSigmoid",), True, False),
    }
    (sig,) = [l for l in discover(graphs.sigmoid_conv()) if l.op_type == "Conv"]
    assert sig.nonnegative and not sig.zero_preserving


def test_constant_node_weights_and_identity():
    conv, fc = discover(graphs.constant_weight())
    assert conv.channels == 6 and fc.channels == 10 and fc.is_head
    model = graphs.constant_weight()
    node = producer(model, conv.output)
    w, where = find_weight(model, node.input[1])
    assert w.shape == (6, 3, 3, 3) and where == "constant"
    w, where = find_weight(model, producer(model, fc.output).input[2])
    assert where == "initializer" and w.shape == (10,)
    with pytest.raises(ScannerError):
        find_weight(model, "x")


def test_unnamed_nodes_get_stable_ids():
    layers = discover(graphs.unnamed())
    assert [l.node for l in layers] == ["Conv_0", "Conv_3", "Gemm_7"]
    assert layers == discover(graphs.unnamed())


def test_conv1d():
    conv, fc = discover(graphs.conv1d())
    assert (conv.rank, conv.spatial, conv.channels) == (3, (12,), 5)


@pytest.mark.parametrize("opset", graphs.OPSETS)
@pytest.mark.parametrize("batch", ["N", 1])
def test_opsets_and_batch(opset, batch):
    layers = discover(graphs.conv_bn_relu(opset=opset, batch=batch))
    assert [l.channels for l in layers] == [8, 16, 10]
    assert layers[1].spatial == (8, 8)


def test_dynamic_spatial():
    conv1, conv2, _ = discover(graphs.conv_relu(dynamic_spatial=True))
    assert conv1.spatial is None and conv1.rank == 4


def test_select_last_all_ids():
    layers = discover(graphs.conv_bn_relu())
    assert select(layers, "last") == [layers[1]]
    assert select(layers, "all") == layers
    assert select(layers, f"{layers[2].id},{layers[0].id}") == [layers[0], layers[2]]
    assert select(layers, [layers[1].id]) == [layers[1]]
    assert select(layers, "/conv1/Conv") == [layers[0]]
    with pytest.raises(ScannerError, match="valid ids"):
        select(layers, "nope")


def test_select_last_without_conv_and_nothing():
    layers = discover(graphs.mlp())
    assert select(layers, "last") == [layers[1]]
    head_only = [l for l in layers if l.is_head]
    with pytest.raises(NothingToAnalyse):
        select(head_only, "last")
    assert discover(graphs.no_layers()) == []
    with pytest.raises(NothingToAnalyse):
        select([], "all")


def test_every_graph_checks_and_discovers():
    for name, build in graphs.ALL.items():
        for opset in graphs.OPSETS:
            model = build(opset=opset)
            onnx.checker.check_model(model)
            layers = discover(model)
            assert layers, name
            assert len({l.id for l in layers}) == len(layers)
            assert sum(l.is_last_conv for l in layers) == int(any(l.op_type.startswith("Conv") for l in layers))
            assert all(np.all(np.array(l.spatial or ()) > 0) for l in layers)


@pytest.mark.parametrize("name", sorted(graphs.ALL))
def test_shape_inference_on_a_weightless_skeleton_gives_the_same_shapes(name, monkeypatch):
    """Types and shapes come from a copy without the float weights' values: the same ValueInfo as inference on the
    whole model, and what stays referenced is not a second copy of every weight."""
    from scanner.graph import layers

    monkeypatch.setattr(layers, "SKELETON_ELEMENTS", 4)  # the test graphs' weights are small: strip nearly all
    model = graphs.ALL[name]()
    full = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True).graph
    want = {vi.name: vi for vi in list(full.input) + list(full.value_info) + list(full.output)}
    assert layers._infer(model) == want
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 4]
    kept = {t.name: t for t in layers._skeleton(model).graph.initializer}
    assert floats and all(not kept[t.name].raw_data and not kept[t.name].float_data for t in floats)
