"""onnxruntime sessions on CPU or CUDA, imported lazily with a clear message when missing."""

import logging
import os
from dataclasses import dataclass

import numpy as np
import onnx

from scanner.errors import ScannerError

log = logging.getLogger("scanner")

DEVICES = ("auto", "cpu", "cuda")
_ORT = None


def ort():
    """The onnxruntime module, or a ScannerError that says how to install it."""
    global _ORT
    if _ORT is None:
        try:
            import onnxruntime
        except ImportError:
            raise ScannerError(
                "onnxruntime is not installed: pip install 'scanner[cpu]' (or 'scanner[gpu]' for CUDA; never both)"
            ) from None
        if hasattr(onnxruntime, "preload_dlls") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            try:
                onnxruntime.preload_dlls()
            except Exception as exc:  # best effort; the provider check below is what counts
                log.debug("preload_dlls failed: %s", exc)
        onnxruntime.set_default_logger_severity(4)  # errors come back as exceptions: no log lines on stderr
        _ORT = onnxruntime
    return _ORT


def check_device(device):
    """Raise the one-line error for a ``device`` this onnxruntime cannot give (before any model is opened)."""
    if device not in DEVICES:
        raise ScannerError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and "CUDAExecutionProvider" not in ort().get_available_providers():
        raise ScannerError("--device cuda: this onnxruntime has no CUDA provider; pip install 'scanner[gpu]'")


def wants_cuda(device):
    """Whether a session for ``device`` will ask for the CUDA provider (``auto``: when this onnxruntime has it)."""
    return device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in ort().get_available_providers())


class Session:
    """An onnxruntime session for one model with the provider the user asked for.

    ``run`` takes the image input (any batch size) and extra feeds; it splits batches to fit a model
    exported with a fixed batch size. ``memory_pattern``: onnxruntime's preplanned memory block (off for
    instrumented models, where it costs memory and buys nothing measurable: benchmarks/RESULTS.md).
    """

    def __init__(self, model, device="auto", threads=None, source=None, memory_pattern=True):
        """``model``: a path, a ModelProto, its serialized bytes or a :class:`Detached` one."""
        rt = ort()
        self.source = source if source is not None else (model if isinstance(model, (str, os.PathLike)) else None)
        check_device(device)

        def opts():
            o = rt.SessionOptions()
            o.log_severity_level = 4
            o.enable_mem_pattern = bool(memory_pattern)
            if threads:
                o.intra_op_num_threads = int(threads)
                o.inter_op_num_threads = 1
            return o

        if isinstance(model, onnx.ModelProto):
            model = detach(model)
        want_cuda = wants_cuda(device)
        providers = ["CPUExecutionProvider"]
        if want_cuda:
            providers = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"]
        self.session = self._create(model, opts, providers, self.source)
        release_freed_memory()
        self.provider = self.session.get_providers()[0]
        if want_cuda and self.provider != "CUDAExecutionProvider":
            if device == "cuda":
                raise ScannerError("--device cuda: onnxruntime fell back to CPU (no usable GPU or CUDA libraries)")
            self.session = self._create(model, opts, ["CPUExecutionProvider"], self.source)
            self.provider = "CPUExecutionProvider"
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        batch = inputs[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._run_options = rt.RunOptions()
        self._run_options.log_severity_level = 4

    @staticmethod
    def _create(model, opts, providers, source=None):
        """A session of ``model``; ``opts`` makes fresh SessionOptions (a Detached model's weights go into them)."""
        rt = ort()
        try:
            if isinstance(model, (str, os.PathLike)):
                return rt.InferenceSession(str(model), opts(), providers=providers)
            o = opts()
            if isinstance(model, Detached):
                names = list(model.weights)
                o.add_external_initializers(names, [rt.OrtValue.ortvalue_from_numpy(model.weights[n]) for n in names])
                model = model.skeleton
            data = model if isinstance(model, bytes) else _serialize(model)
            if data is not None:
                return rt.InferenceSession(data, o, providers=providers)
            return _session_via_file(rt, model, o, providers)
        except ScannerError:
            raise
        except MemoryError:
            raise ScannerError("onnxruntime ran out of memory loading the model", source) from None
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ScannerError(f"onnxruntime cannot load the model: {first[:240]}", source) from None

    def run(self, x, outputs=None, feeds=None):
        """Run on image tensor ``x``; return ``{output name: array}`` for ``outputs`` (default all)."""
        names = list(outputs) if outputs else self.output_names
        feeds = dict(feeds or {})
        n = len(x)
        step = self.fixed_batch or n
        parts = []
        for s in range(0, n, step):
            chunk = x[s : s + step]
            pad = step - len(chunk) if self.fixed_batch else 0
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            try:
                res = self.session.run(names, {self.input_name: chunk, **feeds}, self._run_options)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ScannerError(f"onnxruntime failed to run the model: {first[:240]}", self.source) from None
            parts.append([r[: len(r) - pad] if pad else r for r in res])
        if len(parts) == 1:
            return dict(zip(names, parts[0]))
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


DETACH_BYTES = 4096
"""Initializers larger than this go to a session beside the graph (:func:`detach`), not inside its bytes."""


@dataclass
class Detached:
    """A model for a session as a graph without its large weights (``skeleton``, each such initializer marked as
    external data) and those weights as arrays. onnxruntime copies them straight in: no protobuf bytes of the
    weights are written and parsed again (1.3 s and a model-sized buffer for ViT-B/16)."""

    skeleton: object
    weights: dict


def detach(model):
    """A :class:`Detached` copy of ModelProto ``model`` (the proto is not modified)."""
    from onnx import TensorProto, numpy_helper

    from scanner.graph.layers import stripped_copy

    kinds = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16, TensorProto.INT8,
             TensorProto.UINT8)  # weights; integer index and shape tensors stay where shape inference reads them
    size = {k: onnx.helper.tensor_dtype_to_np_dtype(k).itemsize for k in kinds}  # raw_data's length, unread
    skeleton, pairs = stripped_copy(model, lambda t: t.data_location != TensorProto.EXTERNAL and t.data_type in kinds
                                    and t.HasField("raw_data") and int(np.prod(t.dims)) * size[t.data_type] > DETACH_BYTES)
    weights = {}
    for original, reduced in pairs:
        weights[original.name] = numpy_helper.to_array(original)
        reduced.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "scanner-detached"), ("offset", "0"), ("length", str(weights[original.name].nbytes))):
            reduced.external_data.add(key=key, value=value)
    return Detached(skeleton, weights)


def release_freed_memory():
    """Hand the heap that freed protos leave behind back to the system (glibc keeps it otherwise: a model's size
    or more, for the whole run). A no-op where the C library has no malloc_trim."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _serialize(model):
    """The model's bytes, or None when it is over the 2 GB protobuf limit (protobuf refuses to write it: asking
    first, with ByteSize, cost as long as writing it)."""
    try:
        data = model.SerializeToString()
    except Exception:  # noqa: BLE001 - protobuf EncodeError "Failed to serialize proto": over 2 GB
        return None
    return data if len(data) <= MAX_SESSION_BYTES else None


MAX_SESSION_BYTES = 2**31 - 1 - (1 << 20)
"""Largest serialized model a session is made from in memory (the 2 GB protobuf limit, 1 MiB of headroom)."""


def _session_via_file(rt, model, opts, providers):
    """A session for a model over 2 GB: saved with external data to a temp folder, opened by path."""
    from scanner.graph.model import saved_by_path

    with saved_by_path(model) as path:
        return rt.InferenceSession(path, opts, providers=providers)
