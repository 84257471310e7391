"""Model coverage in CI: shrunken torchvision architectures along the export paths of the full matrix.

The files in tests/data/coverage/ come from ``tests/data/coverage/make.py`` (torch, dev only); the full matrix
(full-size models, every export path) is ``benchmarks/coverage.py``. Here, on each file: ``scanner inspect``
finds the layers, ``scanner scan --layers all`` gives finite norms, the in-graph norms equal numpy norms of the
exposed activations, and pruning random channels reads exactly 0 there, leaves upstream layers identical and
writes a model that passes the checker and loads in onnxruntime.
"""

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from scanner.graph.instrument import NORMS, instrument
from scanner.graph.layers import CONV_OPS, discover
from scanner.graph.model import load_model
from scanner.runtime.session import Session
from scanner.graph.surgery import prune

DATA = Path(__file__).resolve().parent / "data" / "coverage"
MANIFEST = json.loads((DATA / "manifest.json").read_text())
FILES = sorted(MANIFEST)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three random RGB PNGs per image size used by the files."""
    rng = np.random.default_rng(0)
    folders = {}
    for size in sorted({m["size"] for m in MANIFEST.values()}):
        folder = tmp_path_factory.mktemp(f"images{size}")
        for i in range(3):
            cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        folders[size] = folder
    return folders


def model_input(mf, n=3):
    dims = [d if isinstance(d, int) else n for d in mf.input.shape]
    dims[0] = n
    rng = np.random.default_rng(1)
    if mf.input.dtype == "uint8":
        return rng.integers(0, 256, dims, dtype=np.uint8)
    return rng.standard_normal(dims).astype(np.float32)


def numpy_norms(a, layer):
    a = np.abs(a.astype(np.float64))
    if layer.rank == 2:
        return a, a, a
    n = a.shape[0]
    a = a.reshape(n, layer.channels, -1) if layer.channel_axis == 1 else np.moveaxis(a.reshape(n, -1, layer.channels), 1, 2)
    return a.max(2), a.sum(2), np.sqrt((a * a).sum(2))


def test_files_are_small_and_complete():
    sizes = [p.stat().st_size for p in DATA.glob("*.onnx*")]
    assert all(s < 3_000_000 for s in sizes) and sum(sizes) < 10_000_000
    assert {m["path"] for m in MANIFEST.values()} >= {"dynamo", "legacy", "legacy-bn", "legacy-op13", "static-b1", "external", "uint8-nhwc"}
    for name in FILES:
        assert (DATA / name).exists(), name
    assert (DATA / "densenet_tiny_external.onnx.data").exists()


@pytest.mark.parametrize("name", FILES)
def test_inspect_finds_layers(name, run_cli):
    facts = MANIFEST[name]
    code, out, _ = run_cli("inspect", DATA / name, "--format", "json")
    assert code == 0
    info = json.loads(out)
    assert info["model"]["opset"] == facts["opset"]
    layers = info["layers"]
    convs = [l for l in layers if l["op_type"] in CONV_OPS]
    assert len(convs) == facts["conv2d"]
    assert len(layers) - len(convs) >= facts["linear"]
    assert sum(l["is_last_conv"] for l in layers) == 1
    if facts["path"] == "external":
        assert info["model"]["external_data"] == [name + ".data"]
    if facts["path"] == "uint8-nhwc":
        assert info["preprocess"]["layout"] == "NHWC" and info["preprocess"]["dtype"] == "uint8"


@pytest.mark.parametrize("name", [n for n in FILES if n.startswith("vit")])
def test_vit_mlp_hidden_units_are_read_after_gelu(name):
    """The MLP's hidden units are the channels, read over tokens after GELU (an op or its Erf decomposition);
    attention projections on (tokens, N, C) maps are left out."""
    layers = discover(load_model(DATA / name).proto)
    hidden = [l for l in layers if l.channels == 128]
    assert len(hidden) == 2
    for l in hidden:
        assert l.op_type in ("MatMul", "Gemm") and l.rank == 3 and l.channel_axis == 2 and l.spatial == (5,)
        assert l.chain[-1] == "Gelu" or ("Erf" in l.chain and l.chain[-1] == "Mul"), l.chain
        assert l.zero_preserving


def test_decomposed_hardswish_is_read_after_the_activation():
    layers = discover(load_model(DATA / "mobilenet_v3_small_legacy_op13.onnx").proto)
    assert layers[0].chain == ("Conv", "HardSigmoid", "Mul") and layers[0].zero_preserving


@pytest.mark.parametrize("name", FILES)
def test_scan_all_layers_finite(name, run_cli, images, tmp_path):
    out_json = tmp_path / "scan.json"
    code, out, _ = run_cli("scan", DATA / name, "--data", images[MANIFEST[name]["size"]], "--layers", "all",
                           "--format", "json", "-q", "--device", "cpu", "-o", out_json)  # fmt: skip
    assert code == 0
    report = json.loads(out_json.read_text())
    assert len(report["layers"]) == len(discover(load_model(DATA / name).proto))
    for layer in report["layers"]:
        for k in NORMS:
            mean = np.array(layer["clean"][k]["mean"], np.float64)
            assert mean.shape == (layer["channels"],) and np.all(np.isfinite(mean)), (layer["id"], k)


@pytest.fixture(scope="module")
def exposed():
    """{file: (model file, layers, input, exposed run)}, computed once per file."""
    cache = {}

    def get(name):
        if name not in cache:
            mf = load_model(DATA / name)
            layers = discover(mf.proto)
            inst = instrument(mf.proto, layers, expose=True)
            x = model_input(mf)
            cache[name] = (mf, layers, x, inst, Session(inst.model, "cpu").run(x))
        return cache[name]

    return get


@pytest.mark.parametrize("name", FILES)
def test_norms_equal_numpy_on_exposed_taps(name, exposed):
    mf, layers, x, inst, out = exposed(name)
    logits = mf.outputs[0].name
    plain = Session(mf.proto, "cpu").run(x, [logits])[logits]
    np.testing.assert_allclose(out[logits], plain, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(plain).max()))
    for layer in layers:
        lo, hi = inst.slices[layer.id]
        for k, want in zip(NORMS, numpy_norms(out[inst.taps[layer.id]], layer)):
            got = out[inst.norm_outputs[k]][:, lo:hi]
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(want).max()), err_msg=f"{layer.id} {k}")


def _save_like(model, name, dst):
    if (DATA / (name + ".data")).exists():
        onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        onnx.save(model, str(dst))


@pytest.mark.parametrize("name", FILES)
def test_prune_random_channels(name, exposed, tmp_path):
    mf, layers, x, inst, ref = exposed(name)
    rng = np.random.default_rng(7)
    ok = [l for l in layers if l.zero_preserving]
    chosen = [ok[i] for i in rng.choice(len(ok), size=min(3, len(ok)), replace=False)]
    chosen += [l for l in ok if l.is_last_conv and l not in chosen]
    plan = {l.id: sorted(int(c) for c in rng.choice(l.channels, max(1, l.channels // 4), replace=False)) for l in chosen}
    refused = [l for l in layers if not l.zero_preserving]
    if refused:  # f(0) != 0 (Sigmoid, HardSigmoid gates): refused with a clear message
        with pytest.raises(Exception, match="cannot prune through"):
            prune(mf.proto, {refused[0].id: [0]}, layers)
    out_path = tmp_path / name
    _save_like(prune(mf.proto, plan, layers), name, out_path)
    onnx.checker.check_model(str(out_path), full_check=True)
    Session(str(out_path), "cpu")
    pruned = load_model(out_path)
    assert pruned.input == mf.input and [o.name for o in pruned.outputs] == [o.name for o in mf.outputs]
    again = discover(pruned.proto)
    assert [l.id for l in again] == [l.id for l in layers]
    pinst = instrument(pruned.proto, again, norms=False, expose=True)
    out = Session(pinst.model, "cpu").run(x)
    first = min(l.index for l in chosen)
    for l in chosen:
        a = np.moveaxis(out[pinst.taps[l.id]], l.channel_axis, 0)
        assert np.all(a[plan[l.id]] == 0), l.id
        if l.index == first:
            b = np.moveaxis(ref[inst.taps[l.id]], l.channel_axis, 0)
            keep = np.setdiff1d(np.arange(l.channels), plan[l.id])
            np.testing.assert_allclose(a[keep], b[keep], rtol=1e-5, atol=1e-6 * max(1.0, np.abs(b).max()))
    for l in layers:
        if l.index < first:
            assert np.array_equal(out[pinst.taps[l.id]], ref[inst.taps[l.id]]), f"{l.id} upstream changed"


def test_weights_behind_transpose_are_found_and_copied_when_pruned():
    """Legacy export without constant folding: MatMul(x, Transpose(W)). The layer is found; pruning writes a new
    weight and leaves W (and the Transpose) as they were."""
    mf = load_model(DATA / "vit_tiny_legacy_bn.onnx")
    layers = discover(mf.proto)
    producers = {o: n for n in mf.proto.graph.node for o in n.output}
    mlp = [l for l in layers if l.op_type == "MatMul"]
    assert len(mlp) == 4
    node = next(n for n in mf.proto.graph.node if n.output[0] == mlp[0].output)
    transpose = producers[node.input[1]]
    assert transpose.op_type == "Transpose"
    before = {t.name: t.SerializeToString() for t in mf.proto.graph.initializer}
    pruned = prune(mf.proto, {mlp[0].id: [0, 5]}, layers)
    after = {t.name: t.SerializeToString() for t in pruned.graph.initializer}
    assert after[transpose.input[0]] == before[transpose.input[0]]
    new = next(n for n in pruned.graph.node if n.output[0] == mlp[0].output).input[1]
    w = onnx.numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == new))
    assert np.all(w[:, [0, 5]] == 0) and np.any(w[:, 1] != 0)
