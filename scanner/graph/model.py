"""Load an ONNX model file as untrusted input: validate, hash, and describe it."""

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from scanner.errors import ScannerError

SUPPORTED_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
MAX_PROTO_BYTES = 2**31 - 1
MAX_INPUT_ELEMENTS = 1 << 26
"""Largest image input (elements per image) accepted: 3 x 4729 x 4729; a classifier input beyond is absurd."""
_FLOATS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64}
_SUB_BYTE = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, n)}


@dataclass
class TensorInfo:
    """A graph input or output: name, shape (ints, or strings for symbolic dims), numpy dtype."""

    name: str
    shape: list
    dtype: str

    def to_dict(self):
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype}


@dataclass
class ModelFile:
    """A loaded, validated model."""

    path: Path
    proto: onnx.ModelProto
    sha256: str
    input: TensorInfo
    outputs: list
    opset: int
    metadata: dict = field(default_factory=dict)
    external_data: list = field(default_factory=list)

    @property
    def input_dtype(self):
        return np.dtype(self.input.dtype)

    def facts(self):
        """Model facts for reports (of the file as read: computed once, before anything edits the proto)."""
        if getattr(self, "_facts", None) is None:
            self._facts = self._read_facts()
        return dict(self._facts)

    def _read_facts(self):
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "ir_version": self.proto.ir_version,
            "opset": self.opset,
            "producer": f"{self.proto.producer_name} {self.proto.producer_version}".strip(),
            "input": self.input.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
            "nodes": len(self.proto.graph.node),
            "external_data": self.external_data,
        }


def sha256_file(path):
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_info(value_info):
    """TensorInfo of a ValueInfoProto."""
    t = value_info.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
    except (KeyError, TypeError, ValueError):
        try:
            dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower()
        except ValueError:  # a number no ONNX type has
            dtype = f"unknown type {t.elem_type}"
    return TensorInfo(value_info.name, shape, dtype)


def _tensors(proto):
    """Initializers and Constant-node tensors of the main graph."""
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensors.append(attr.t)
    return tensors


def _external_locations(proto, base):
    """Check every external-data location stays inside the model's folder; return the relative paths."""
    locations = []
    base_real = os.path.realpath(base)
    for t in _tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or Path(loc).drive or ".." in Path(loc).parts or "\\" in loc or "\0" in loc:
            raise ScannerError(f"external data location {loc!r} of tensor {t.name!r} is outside the model's folder; refused")
        real = os.path.realpath(os.path.join(base, loc))
        if os.path.commonpath([real, base_real]) != base_real:
            raise ScannerError(f"external data {loc!r} of tensor {t.name!r} resolves outside the model's folder (symlink); refused")
        if not os.path.isfile(real):
            raise ScannerError(f"external data file {loc!r} (tensor {t.name!r}) not found")
        if loc not in locations:
            locations.append(loc)
    return locations


def _nbytes(t):
    """Bytes a tensor's data takes, or None for types without a fixed item size."""
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    n = int(np.prod([int(d) for d in t.dims], dtype=object)) if len(t.dims) else 1
    if t.data_type in _SUB_BYTE:
        return (n + 1) // 2
    return n * item


def _load_external_data(proto, base):
    """Read every external tensor into the proto, checking offset, length and finiteness first."""
    for t in _tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info["location"]
        try:
            offset = int(info.get("offset") or 0)
            length = int(info["length"]) if info.get("length") not in (None, "") else None
        except ValueError:
            raise ScannerError(f"external data of tensor {t.name!r} has a non-integer offset or length") from None
        path = os.path.join(base, loc)
        size = os.path.getsize(path)
        expected = _nbytes(t)
        if length is None:
            length = expected if expected is not None else size - offset
        if offset < 0 or length < 0:
            raise ScannerError(f"external data of tensor {t.name!r} has a negative offset or length")
        if expected is not None and length != expected:
            raise ScannerError(f"external data of tensor {t.name!r}: length {length} does not match its shape {list(t.dims)} ({expected} bytes)")
        if offset + length > size:
            raise ScannerError(f"external data file {loc!r} is too short for tensor {t.name!r} (needs {offset + length} bytes, has {size})")
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise ScannerError(f"external data file {loc!r} ended early while reading tensor {t.name!r}")
        if t.data_type in _FLOATS:
            _check_finite(np.frombuffer(data, _FLOATS[t.data_type]), t.name)
        t.raw_data = data
        del data
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]


def load_model(path):
    """Read and validate an ONNX classifier; raise ScannerError naming the file and the problem."""
    path = Path(path)
    try:
        try:
            return _load(path)
        except ScannerError as exc:
            if exc.path is None:
                raise ScannerError(str(exc), path) from exc
            raise
    except RecursionError:
        raise ScannerError("model graph is nested too deeply to read", path) from None
    except MemoryError:
        raise ScannerError("model is too large to load in memory", path) from None


def _load(path):
    if not path.exists():
        raise ScannerError("model file not found")
    if not path.is_file():
        raise ScannerError("model path is not a file")
    size = path.stat().st_size
    if size == 0:
        raise ScannerError("model file is empty")
    if size > MAX_PROTO_BYTES:
        raise ScannerError("model file is over 2 GB; save it with external data (onnx.save(..., save_as_external_data=True))")
    try:
        data = path.read_bytes()  # read once: parsed, checked and hashed from memory
        digest = _hash_in_background(data)  # hashlib lets go of the GIL: the hash overlaps parsing and checking
        proto = onnx.load_model_from_string(data)
    except OSError as exc:
        raise ScannerError(f"cannot read the model file ({exc.strerror or exc})") from None
    except Exception as exc:  # protobuf DecodeError and friends
        raise ScannerError(f"not a valid ONNX model ({type(exc).__name__}: {str(exc)[:120] or 'cannot parse'})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise ScannerError("not an ONNX model (no graph or no nodes)")
    if proto.ir_version < 3 or proto.ir_version > onnx.IR_VERSION:
        raise ScannerError(f"unsupported IR version {proto.ir_version} (this onnx supports 3..{onnx.IR_VERSION})")
    opset = 0
    max_opset = onnx.defs.onnx_opset_version()
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
        elif imp.domain not in SUPPORTED_DOMAINS:
            raise ScannerError(f"uses custom operator domain {imp.domain!r}, which onnxruntime cannot run without its library")
    if not 7 <= opset <= max_opset:
        raise ScannerError(f"unsupported opset {opset} (supported: 7..{max_opset})")
    used = {n.domain for n in proto.graph.node}
    custom = sorted(d for d in used if d not in SUPPORTED_DOMAINS)
    if custom:
        raise ScannerError(f"uses custom operator domain {custom[0]!r}, which onnxruntime cannot run without its library")
    external = _external_locations(proto, path.parent)
    try:
        onnx.checker.check_model(str(path) if external else data)  # the file's bytes: no second serialization
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScannerError(f"invalid ONNX model: {first[:200]}") from None
    inputs = _image_input(proto)
    outputs = [tensor_info(o) for o in proto.graph.output]
    if not outputs:
        raise ScannerError("model has no outputs")
    _check_weights(proto)
    if external:
        try:
            _load_external_data(proto, str(path.parent))
        except OSError as exc:
            raise ScannerError(f"cannot read external data ({exc.strerror or exc})") from None
    metadata = {p.key: p.value for p in proto.metadata_props}
    del data
    return ModelFile(path, proto, digest.result(), inputs, outputs, opset, metadata, external)


def _hash_in_background(data):
    """A future of the hex sha256 of ``data``."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(lambda: hashlib.sha256(data).hexdigest())
    pool.shutdown(wait=False)  # the worker ends with its one task
    return future


def _image_input(proto):
    init = {i.name for i in proto.graph.initializer}
    real = [tensor_info(i) for i in proto.graph.input if i.name not in init]
    if len(real) != 1:
        names = ", ".join(i.name for i in real) or "none"
        raise ScannerError(f"expected one image input, found {len(real)} ({names})")
    inp = real[0]
    if len(inp.shape) != 4:
        raise ScannerError(f"input {inp.name!r} has shape {inp.shape}; an image classifier needs (N, C, H, W) or (N, H, W, C)")
    if inp.dtype not in ("float32", "float16", "float64", "uint8", "int8"):
        raise ScannerError(f"input {inp.name!r} has dtype {inp.dtype}; expected a float or 8-bit image tensor")
    known = [d for d in inp.shape[1:] if isinstance(d, int)]
    if any(d <= 0 for d in known) or int(np.prod(known or [1])) > MAX_INPUT_ELEMENTS:
        raise ScannerError(f"input {inp.name!r} shape {inp.shape} is absurd (non-positive or too many elements)")
    return inp


def _check_finite(values, name, chunk=1 << 24):
    """Raise when a flat float array holds NaN or Inf (checked in chunks: no full-size temporary)."""
    for s in range(0, values.size, chunk):
        if not np.isfinite(values[s : s + chunk]).all():
            raise ScannerError(f"weight {name!r} contains NaN or Inf")


def _check_weights(proto):
    """Every tensor held in the file has as much data as its shape says, and no float one holds NaN/Inf.

    External tensors are checked when they are read (:func:`_load_external_data`).
    """
    tensors = _tensors(proto) + [s.values for s in proto.graph.sparse_initializer]
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if t.raw_data:
            raw = t.raw_data
            expected = _nbytes(t)
            if expected is not None and len(raw) != expected:
                raise ScannerError(f"weight {t.name!r}: {len(raw)} bytes of data do not match its shape {list(t.dims)}")
            if t.data_type in _FLOATS:
                _check_finite(np.frombuffer(raw, _FLOATS[t.data_type]), t.name)
            continue
        try:
            arr = numpy_helper.to_array(t)
        except Exception as exc:  # noqa: BLE001 - malformed tensor: wrong element count for its dims, bad type
            raise ScannerError(f"weight {t.name!r} cannot be read ({' '.join(str(exc).split())[:120]})") from None
        if t.data_type in _FLOATS:
            _check_finite(np.asarray(arr, np.float64).reshape(-1), t.name)


def over_2gb(proto):
    """Whether ``proto`` cannot be serialized in one piece (the 2 GB protobuf limit, with 1 MiB of headroom)."""
    try:
        return proto.ByteSize() > MAX_PROTO_BYTES - (1 << 20)
    except Exception:  # noqa: BLE001 - protobuf refuses to size messages over 2 GB
        return True


@contextlib.contextmanager
def saved_by_path(proto):
    """Yield the path of ``proto`` saved with external data in a temp folder (for models over 2 GB, which
    onnx.checker and onnxruntime take only by path). ``onnx.save`` moves the weights out of the proto in
    place; they are read back afterwards, so the caller's proto is unchanged."""
    with tempfile.TemporaryDirectory(prefix="scanner-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            onnx.save(proto, path, save_as_external_data=True, location="model.onnx.data")
            yield path
        finally:
            onnx.load_external_data_for_model(proto, tmp)


FLOAT_TYPES = ("float32", "float16", "float64")


def scores_output(model, name=None):
    """The graph output that holds the class scores (logits or probabilities), by ``name`` or on purpose.

    Without a name: the one float output shaped (N, K) or (N, K, 1, 1) with K >= 2 (K may be symbolic).
    Raises ScannerError naming the outputs when there is none (an int64 label, a one-score binary model) or more
    than one (choose with ``--scores NAME``)."""
    outs = {o.name: o for o in model.outputs}
    if name is not None:
        o = outs.get(name)
        if o is None:
            raise ScannerError(f"--scores {name!r}: no such graph output (outputs: {_describe(model.outputs)})", model.path)
        if o.dtype not in FLOAT_TYPES:
            raise ScannerError(f"--scores {name!r}: output is {o.dtype}, not float class scores", model.path)
        return name
    good = [o for o in model.outputs if _score_shape(o) == "ok"]
    if len(good) == 1:
        return good[0].name
    if good:
        raise ScannerError(f"several outputs could be the class scores ({_describe(good)}); choose one with --scores NAME",
                           model.path)
    binary = [o for o in model.outputs if _score_shape(o) == "binary"]
    if binary:
        raise ScannerError(f"output {binary[0].name!r} has a single score (a binary classifier); scanner needs one score "
                           f"per class (at least 2)", model.path)
    raise ScannerError(f"no output holds class scores: expected a float output shaped (N, K) or (N, K, 1, 1) with K >= 2 "
                       f"(outputs: {_describe(model.outputs)}); choose one with --scores NAME", model.path)


def _score_shape(o):
    """``ok``, ``binary`` (K = 1) or ``no`` for a graph output."""
    if o.dtype not in FLOAT_TYPES:
        return "no"
    dims = o.shape
    if not dims:  # no shape recorded: it may be the scores
        return "ok"
    if len(dims) == 2 or (len(dims) == 4 and all(d == 1 for d in dims[2:])):
        k = dims[1]
        if isinstance(k, int) and k == 1:
            return "binary"
        return "ok" if not isinstance(k, int) or k >= 2 else "no"
    return "no"


def _describe(outputs):
    return ", ".join(f"{o.name} {o.dtype} {o.shape}" for o in outputs) or "none"
