"""Hostile inputs: every bad model, image, flag or output path gives exit 2 (or the documented code), one
clear line on stderr naming the file and the problem, no traceback, and nothing written.

Every case is built here, from the zoo model ``models/cnn_clean.onnx`` and its clean images.
"""

import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import graphs
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import CLEAN, MODELS

TRIGGER = MODELS / "triggers" / "badnets_3x3.json"


# ---- helpers ---------------------------------------------------------------------------------------
def zoo(name):
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"zoo model {path.name} missing")
    return path


def snapshot(folder):
    """{relative path: sha256} of every file under ``folder`` (what must not change)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = Path(root) / f
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "?"
    return out


@pytest.fixture
def work(tmp_path):
    """A folder holding a copy of the clean zoo model (``model.onnx``) and a few clean images (``images/``)."""
    shutil.copy(zoo("cnn_clean"), tmp_path / "model.onnx")
    (tmp_path / "images").mkdir()
    for f in sorted(os.listdir(CLEAN))[:3]:
        shutil.copy(CLEAN / f, tmp_path / "images" / f)
    return tmp_path


@pytest.fixture
def refused(run_cli, tmp_path):
    """Run the CLI; assert exit ``code``, empty stdout, one stderr line naming ``names`` and no file written."""

    def check(*args, names=(), problem=None, code=2):
        before = snapshot(tmp_path)
        rc, out, err = run_cli(*args)
        if os.environ.get("SHOW_ERR"):
            print("\nERR", err.strip().replace(str(tmp_path), "$T"))
        assert rc == code, (rc, err)
        assert out == ""
        assert err.count("\n") == 1 and err.endswith("\n"), err
        assert err.startswith("scanner: error: ") and "Traceback" not in err, err
        for name in names:
            assert str(name) in err, (name, err)
        if problem:
            assert problem.lower() in err.lower(), (problem, err)
        assert snapshot(tmp_path) == before, "a file was written or changed"
        return err

    return check


def save(model, path):
    onnx.save(model, str(path))
    return path


def edited(work, fn, name="bad.onnx"):
    """A copy of the work model edited by ``fn(proto)``, saved as ``name`` beside it."""
    m = onnx.load(str(work / "model.onnx"))
    fn(m)
    return save(m, work / name)


def set_init(m, index, value):
    t = m.graph.initializer[index]
    t.CopyFrom(numpy_helper.from_array(value, t.name))


def png_bytes(w, h, color_type=0):
    """A valid PNG of ``w`` x ``h`` zero pixels, deflated row by row (a decompression bomb when large)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + w * (3 if color_type == 2 else 1))
    body = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def external_model(work, location="weights.data", name="ext.onnx"):
    """The work model saved with external data in ``work/ext/``, then its locations rewritten to ``location``."""
    folder = work / "ext"
    folder.mkdir(exist_ok=True)
    m = onnx.load(str(work / "model.onnx"))
    onnx.save(m, str(folder / "base.onnx"), save_as_external_data=True, location="weights.data", size_threshold=1024)
    m = onnx.load(str(folder / "base.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    return save(m, folder / name), m


# ---- models ----------------------------------------------------------------------------------------
def test_not_onnx_bytes(work, refused):
    bad = work / "bad.onnx"
    bad.write_bytes(b"GIF89a this is not a model \x00\x01\x02" * 10)
    refused("inspect", bad, names=[bad], problem="not a valid ONNX model")


def test_zero_byte_model(work, refused):
    bad = work / "empty.onnx"
    bad.touch()
    refused("inspect", bad, names=[bad], problem="empty")


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_model(work, refused, keep):
    data = (work / "model.onnx").read_bytes()
    bad = work / "trunc.onnx"
    bad.write_bytes(data[: int(len(data) * keep)])
    refused("inspect", bad, names=[bad])


def test_model_missing_and_model_is_a_folder(work, refused):
    refused("inspect", work / "nope.onnx", names=[work / "nope.onnx"], problem="not found")
    (work / "dir.onnx").mkdir()
    refused("inspect", work / "dir.onnx", names=[work / "dir.onnx"], problem="is a directory")


def test_unsupported_ir_version(work, refused):
    bad = edited(work, lambda m: setattr(m, "ir_version", 99))
    refused("inspect", bad, names=[bad], problem="IR version 99")


@pytest.mark.parametrize("version", [99, 5])
def test_unsupported_opset(work, refused, version):
    bad = edited(work, lambda m: setattr(m.opset_import[0], "version", version))
    refused("inspect", bad, names=[bad], problem=f"opset {version}")


def test_rank2_input(work, refused):
    bad = edited(work, lambda m: m.graph.input[0].type.tensor_type.shape.dim.__delitem__(slice(2, None)))
    refused("inspect", bad, names=[bad], problem="needs (N, C, H, W)")


def test_two_inputs(work, refused):
    def add_input(m):
        m.graph.input.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1, 3]))
    bad = edited(work, add_input)
    refused("inspect", bad, names=[bad], problem="expected one image input, found 2")


def test_integer_input_dtype(work, refused):
    bad = edited(work, lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", onnx.TensorProto.INT64))
    refused("inspect", bad, names=[bad])


def test_custom_op_domain(work, refused):
    def custom(m):
        m.opset_import.append(helper.make_opsetid("com.evil", 1))
        m.graph.node[0].domain = "com.evil"
    bad = edited(work, custom)
    refused("inspect", bad, names=[bad], problem="custom operator domain 'com.evil'")


@pytest.mark.parametrize("dims", [(10**6, 10**6), (0, 28), (-3, 28)])
def test_absurd_input_dimensions(work, refused, dims):
    def absurd(m):
        d = m.graph.input[0].type.tensor_type.shape.dim
        d[2].dim_value, d[3].dim_value = dims
    bad = edited(work, absurd)
    refused("inspect", bad, names=[bad])


def test_input_shape_does_not_match_preprocessing(work, refused):
    """A model whose metadata preprocessing disagrees with its input: refused before onnxruntime runs."""
    bad = edited(work, lambda m: setattr(m.graph.input[0].type.tensor_type.shape.dim[2], "dim_value", 100000))
    refused("scan", bad, "--data", work / "images", names=[bad], problem="needs 100000")


def test_bad_preprocess_metadata(work, refused):
    def meta(m):
        for p in m.metadata_props:
            if p.key == "scanner.preprocess":
                p.value = "{not json"
    bad = edited(work, meta)
    refused("inspect", bad, names=[bad], problem="not valid JSON")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_inf_weights(work, refused, value):
    def poison(m):
        a = numpy_helper.to_array(m.graph.initializer[0]).copy()
        a.flat[3] = value
        set_init(m, 0, a)
    bad = edited(work, poison)
    refused("inspect", bad, names=[bad], problem="NaN or Inf")


def test_weight_data_does_not_match_shape(work, refused):
    def short(m):
        t = m.graph.initializer[0]
        t.raw_data = t.raw_data[:-8]
    bad = edited(work, short)
    refused("inspect", bad, names=[bad])


# ---- external data ---------------------------------------------------------------------------------
def test_external_data_inside_the_folder_loads(work, run_cli):
    path, _ = external_model(work)
    code, out, err = run_cli("scan", path, "--data", work / "images", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["model"]["external_data"] == ["weights.data"]


@pytest.mark.parametrize("location", ["../weights.data", "sub/../../weights.data", "/etc/passwd", "..\\weights.data"])
def test_external_data_outside_the_folder(work, refused, location):
    shutil.copy(work / "model.onnx", work / "weights.data")  # a readable file where ../ points
    path, _ = external_model(work, location)
    refused("inspect", path, names=[path], problem="outside the model's folder")


def test_external_data_symlink_out(work, refused, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    path, _ = external_model(work, "link.data")
    shutil.move(work / "ext" / "weights.data", outside / "weights.data")
    os.symlink(outside / "weights.data", work / "ext" / "link.data")
    refused("inspect", path, names=[path], problem="symlink")


def test_external_data_missing_file(work, refused):
    path, _ = external_model(work, "missing.data")
    refused("inspect", path, names=[path, "missing.data"], problem="not found")


@pytest.mark.parametrize("key,value", [("offset", "999999999"), ("length", "12"), ("length", "-5"), ("offset", "x")])
def test_external_data_bad_offset_or_length(work, refused, key, value):
    path, m = external_model(work)
    for e in m.graph.initializer[0].external_data:
        if e.key == key:
            e.value = value
    if key not in {e.key for e in m.graph.initializer[0].external_data}:
        m.graph.initializer[0].external_data.add(key=key, value=value)
    save(m, path)
    refused("inspect", path, names=[path], problem=m.graph.initializer[0].name)


def test_external_data_nan(work, refused):
    path, m = external_model(work)
    data = bytearray((work / "ext" / "weights.data").read_bytes())
    data[0:4] = np.array([np.nan], np.float32).tobytes()
    (work / "ext" / "weights.data").write_bytes(bytes(data))
    refused("inspect", path, names=[path], problem="NaN or Inf")


@pytest.mark.skipif(not os.environ.get("SCANNER_BIG_TESTS"), reason="reads 2 GB (10-50 s, 4-6 GB RAM): set SCANNER_BIG_TESTS=1")
def test_model_over_2gb_loads_by_path(work, run_cli):
    """A >2 GB model (a sparse, all-zero external initializer) inspects and scans by path."""
    if shutil.disk_usage(work).free < 8 << 30:
        pytest.skip("less than 8 GB of free disk")
    m = onnx.load(str(work / "model.onnx"))
    n = (2**31 + 2**20) // 4
    t = m.graph.initializer.add(name="big.unused", data_type=onnx.TensorProto.FLOAT, dims=[n])
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "big.data"), ("offset", "0"), ("length", str(4 * n))):
        t.external_data.add(key=k, value=v)
    save(m, work / "big.onnx")
    with open(work / "big.data", "wb") as f:
        f.truncate(4 * n)  # sparse: no disk used
    code, out, err = run_cli("inspect", work / "big.onnx", "--format", "json")
    assert code == 0, err
    code, out, err = run_cli("scan", work / "big.onnx", "--data", work / "images", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["data"]["clean"]["images"] == 3


# ---- images ----------------------------------------------------------------------------------------
BAD_IMAGES = {
    "random.png": lambda: np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes(),
    "truncated.png": lambda: (CLEAN / sorted(os.listdir(CLEAN))[5]).read_bytes()[:60],
    "zero.png": lambda: b"",
    "broken_header.png": lambda: b"\x89PNG\r\n\x1a\n not really a PNG",
    "text.jpg": lambda: b"this is a text file, not a JPEG\n" * 4,
    "bomb_header.png": lambda: png_bytes(1, 1)[:16] + struct.pack(">II", 100000, 100000) + png_bytes(1, 1)[24:],
    "bomb.png": lambda: png_bytes(9000, 9000),
    "bomb.bmp": lambda: b"BM" + b"\0" * 16 + struct.pack("<ii", 60000, 60000) + b"\0" * 40,
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_is_counted_and_named(work, run_cli, refused, name):
    (work / "images" / name).write_bytes(BAD_IMAGES[name]())
    code, out, err = run_cli("scan", work / "model.onnx", "--data", work / "images", "--format", "json")
    assert code == 0, err
    assert "skipped 1 file(s)" in err and name in err and err.count("\n") == 1
    facts = json.loads(out)["data"]["clean"]
    assert facts["images"] == 3 and facts["skipped"] == 1 and name in facts["skipped_examples"][0]
    # below the minimum: one line naming the folder, the count and the bad file
    refused("scan", work / "model.onnx", "--data", work / "images", "--min-images", 4,
            names=[work / "images", name], problem="only 3 usable image(s), at least 4 needed")


def test_wrong_channel_images_are_converted(work, run_cli):
    """RGB, RGBA and 16-bit images fed to a gray model are converted (usable), not skipped."""
    img = cv2.imread(str(work / "images" / sorted(os.listdir(work / "images"))[0]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(work / "images" / "rgb.png"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(work / "images" / "rgba.png"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA))
    cv2.imwrite(str(work / "images" / "deep.png"), img.astype(np.uint16) * 257)
    cv2.imwrite(str(work / "images" / "big.png"), cv2.resize(img, (300, 200)))
    code, out, err = run_cli("scan", work / "model.onnx", "--data", work / "images", "--format", "json")
    assert code == 0 and err == "", err
    assert json.loads(out)["data"]["clean"] == {**json.loads(out)["data"]["clean"], "images": 7, "skipped": 0}


def test_unreadable_image_permission(work, run_cli):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading the file")
    bad = work / "images" / "locked.png"
    shutil.copy(work / "images" / sorted(os.listdir(work / "images"))[0], bad)
    bad.chmod(0)
    try:
        code, out, err = run_cli("scan", work / "model.onnx", "--data", work / "images", "--format", "json")
    finally:
        bad.chmod(0o644)
    assert code == 0 and "locked.png (cannot read" in err


def test_empty_image_folder(work, refused):
    (work / "none").mkdir()
    refused("scan", work / "model.onnx", "--data", work / "none", names=[work / "none"], problem="no images found")


def test_only_unusable_images(work, refused):
    (work / "junk").mkdir()
    (work / "junk" / "a.png").write_bytes(b"")
    (work / "junk" / "b.png").write_bytes(b"nope")
    refused("scan", work / "model.onnx", "--data", work / "junk", names=[work / "junk", "a.png"], problem="only 0 usable")


def test_fewer_image_files_than_the_minimum_fails_before_reading(work, refused):
    refused("scan", work / "model.onnx", "--data", work / "images", "--min-images", 10,
            names=[work / "images"], problem="only 3 image file(s), at least 10 needed")


def test_data_path_missing(work, refused):
    refused("scan", work / "model.onnx", "--data", work / "nowhere", names=[work / "nowhere"], problem="not found")


@pytest.mark.parametrize("case", ["float", "junk", "no_images", "header_bomb", "pickle"])
def test_bad_npz(work, refused, case):
    path = work / "set.npz"
    if case == "float":
        np.savez(path, images=np.zeros((3, 28, 28), np.float32))
    elif case == "junk":
        path.write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    elif case == "no_images":
        np.savez(path, pixels=np.zeros((3, 28, 28), np.uint8))
    elif case == "pickle":
        np.savez(path, images=np.array([{"a": 1}], dtype=object))
    else:  # an .npy header declaring 10^12 bytes, with 10 bytes of data: refused before any allocation
        header = {"descr": "|u1", "fortran_order": False, "shape": (10**6, 1000, 1000)}
        import io
        import zipfile
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, header)
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("images.npy", buf.getvalue() + b"\0" * 10)
    refused("scan", work / "model.onnx", "--data", path, names=[path])


# ---- preprocessing and trigger files ---------------------------------------------------------------
@pytest.mark.parametrize(
    "text,problem",
    [
        ('{"size": [28', "cannot read preprocessing JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"sise": [28, 28]}', "unknown preprocessing key"),
        ('{"size": [1e400, 5]}', "bad preprocessing value"),
        ('{"std": [0]}', "non-zero"),
        ('{"size": [64, 64]}', "needs 28"),
        ('{"color": "rgb"}', "needs 1"),
        ('{"size": [16384, 16384]}', "too large"),
    ],
)
def test_bad_preprocess_file(work, refused, text, problem):
    pre = work / "pre.json"
    pre.write_text(text)
    refused("scan", work / "model.onnx", "--data", work / "images", "--preprocess", pre, names=[pre], problem=problem)


@pytest.mark.parametrize(
    "spec,problem",
    [
        ('{"kind": "patch"', "not a valid trigger JSON"),
        ('{"kind": "patch"}', "needs the keys"),
        ('{"kind": "spray", "image": "t.png"}', "unknown trigger kind"),
        ('{"kind": "patch", "image": "t.png", "margin": "x"}', "bad trigger value"),
        ('{"kind": "patch", "image": ["t.png"]}', "must be file names"),
        ('{"kind": "blend", "image": "t.png", "alpha": 7}', "alpha"),
        ('{"kind": "patch", "image": "t.png", "position": [1000, 1000]}', "does not fit"),
        ('{"kind": "patch", "image": "missing.png"}', "not found"),
        ('{"kind": "patch", "image": "pre.txt"}', "cannot decode"),
    ],
)
def test_bad_trigger_file(work, refused, spec, problem):
    cv2.imwrite(str(work / "t.png"), np.full((3, 3), 255, np.uint8))
    (work / "pre.txt").write_text("hello")
    trig = work / "trig.json"
    trig.write_text(spec)
    err = refused("scan", work / "model.onnx", "--data", work / "images", "--probe", trig, problem=problem)
    assert str(work) in err


# ---- flags -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,problem",
    [
        (["--no-such-flag"], "no such option"),
        (["--device", "tpu"], "'--device'"),
        (["--limit", "-1"], "'--limit'"),
        (["--batch-size", "0"], "'--batch-size'"),
        (["--min-images", "0"], "'--min-images'"),
        (["--top", "x"], "'--top'"),
        (["--layers", "nope"], "unknown layer 'nope'"),
    ],
)
def test_bad_flags(work, refused, flags, problem):
    refused("scan", work / "model.onnx", "--data", work / "images", *flags, problem=problem)


def test_unknown_command(refused):
    refused("rescan", problem="no such command")


@pytest.mark.parametrize("cmd", ["prune", "sanitize"])
def test_repair_flags_out_of_range(work, refused, cmd):
    refused(cmd, work / "model.onnx", "--data", work / "images", "--probe", TRIGGER, "-o", work / "out.onnx",
            "--max-accuracy-drop", "2", problem="'--max-accuracy-drop'")


# ---- outputs ---------------------------------------------------------------------------------------
def test_output_is_the_input(work, refused):
    model = work / "model.onnx"
    refused("inspect", model, "-o", model, "--force", names=[model], problem="overwrite the input")
    refused("prune", model, "--data", work / "images", "--probe", TRIGGER, "--count", 1, "-o", model, "--force",
            names=[model], problem="overwrite the input")


def test_output_is_a_link_to_the_input(work, refused):
    os.link(work / "model.onnx", work / "hard.onnx")
    refused("prune", work / "model.onnx", "--data", work / "images", "--probe", TRIGGER, "--count", 1,
            "-o", work / "hard.onnx", "--force", problem="overwrite the input")


def test_output_exists_without_force(work, refused):
    (work / "report.json").write_text("keep me")
    refused("inspect", work / "model.onnx", "-o", work / "report.json", names=[work / "report.json"], problem="--force")
    refused("prune", work / "model.onnx", "--data", work / "images", "--probe", TRIGGER, "--count", 1,
            "-o", work / "report.json", problem="--force")
    assert (work / "report.json").read_text() == "keep me"


@pytest.mark.parametrize("cmd", ["inspect", "scan", "prune"])
def test_output_parent_cannot_be_created(work, refused, cmd):
    (work / "afile").write_text("x")
    out = work / "afile" / "sub" / "out.json"
    args = {"inspect": [], "scan": ["--data", work / "images"],
            "prune": ["--data", work / "images", "--probe", TRIGGER, "--count", 1]}[cmd]
    refused(cmd, work / "model.onnx", *args, "-o", out, names=[out], problem="not a folder")


def test_output_is_a_folder(work, refused):
    (work / "out").mkdir()
    refused("inspect", work / "model.onnx", "-o", work / "out", "--force", names=[work / "out"], problem="directory")


def test_output_folder_is_created(work, run_cli):
    code, _, err = run_cli("inspect", work / "model.onnx", "-o", work / "new" / "deep" / "info.txt")
    assert code == 0 and (work / "new" / "deep" / "info.txt").exists()


def test_interrupt_mid_write_leaves_nothing(tmp_path):
    from scanner.fileio import atomic_path

    target = tmp_path / "out.onnx"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a model")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out.onnx"] and target.read_bytes() == b"old"


def test_interrupt_during_prune_write(work, run_cli, monkeypatch):
    """Ctrl-C while the pruned model is being written: exit 130, no output, no temp file."""
    import scanner.repair.verify

    def interrupted_save(proto, path, *a, **k):
        Path(path).write_bytes(proto.SerializeToString()[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(scanner.repair.verify.onnx, "save", interrupted_save)
    before = snapshot(work)
    code, out, err = run_cli("prune", work / "model.onnx", "--data", work / "images", "--probe", TRIGGER,
                             "--count", 1, "-o", work / "out" / "pruned.onnx")
    assert code == 130 and err.strip() == "scanner: interrupted"
    assert snapshot(work) == before and not any(p.is_file() for p in (work / "out").glob("*"))


def test_write_error_is_one_line_and_leaves_nothing(tmp_path):
    from scanner.errors import ScannerError
    from scanner.fileio import atomic_path

    with pytest.raises(ScannerError, match="cannot write"):
        with atomic_path(tmp_path / "x.bin") as tmp:
            raise OSError(28, "No space left on device", str(tmp))
    assert os.listdir(tmp_path) == []


# ---- determinism -----------------------------------------------------------------------------------
def _without_timing(text):
    report = json.loads(text)
    report.pop("timing", None)
    for m in report.get("models", []):
        m.pop("seconds", None)
    return json.dumps(report, sort_keys=True)


def test_scan_json_is_deterministic(run_cli):
    args = ("scan", zoo("cnn_badnets"), "--data", CLEAN, "--probe", TRIGGER, "--limit", 96, "--format", "json", "--layers", "all")
    runs = [run_cli(*args) for _ in range(2)]
    assert runs[0][0] == runs[1][0] == 0
    assert _without_timing(runs[0][1]) == _without_timing(runs[1][1])
    # the raw text differs only in the timing object
    strip = lambda t: "\n".join(l for l in t.splitlines() if "per_second" not in l and '"seconds"' not in l)  # noqa: E731
    assert strip(runs[0][1]) == strip(runs[1][1])


def test_prune_count_is_byte_identical(run_cli, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"p{i}.onnx"
        code, _, err = run_cli("prune", zoo("cnn_badnets"), "--data", CLEAN, "--probe", TRIGGER, "--count", 3,
                               "--limit", 64, "-o", out, "-q", "--always")
        assert code == 4, err  # 3 channels do not remove the backdoor; --always writes the model anyway
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def small_classifier(path):
    """A small 1x28x28 CNN (conv-relu-conv-relu-GAP-Gemm) whose head refit is cheap."""
    net = graphs.Net([1, 28, 28], opset=17, seed=3, name="small")
    x = net.relu(net.conv("x", 1, 6, name="/conv1/Conv"))
    x = net.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.relu(net.conv(x, 6, 8, name="/conv2/Conv"))
    model = net.build(net.head(net.node("GlobalAveragePool", [x]), 8))
    onnx.save(model, str(path))
    return path


def test_sanitize_is_byte_identical(run_cli, tmp_path):
    model = small_classifier(tmp_path / "small.onnx")
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}.onnx"
        code, _, err = run_cli("sanitize", model, "--data", CLEAN, "--probe", TRIGGER, "--limit", 64, "--always",
                               "-o", out, "-q")
        assert code == 0, err  # the trigger does not move this random-weight model: nothing found, --always writes
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
