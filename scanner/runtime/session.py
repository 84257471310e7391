"""onnxruntime sessions on CPU or CUDA, imported lazily with a clear message when missing."""

import logging
import os

import numpy as np

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


class Session:
    """An onnxruntime session for one model with the provider the user asked for.

    ``run`` takes the image input (any batch size) and extra feeds; it splits batches to fit a model
    exported with a fixed batch size.
    """

    def __init__(self, model, device="auto", threads=None, source=None):
        rt = ort()
        self.source = source if source is not None else (model if isinstance(model, (str, os.PathLike)) else None)
        if device not in DEVICES:
            raise ScannerError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
        opts = rt.SessionOptions()
        opts.log_severity_level = 4
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        available = rt.get_available_providers()
        want_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise ScannerError("--device cuda: this onnxruntime has no CUDA provider; pip install 'scanner[gpu]'")
        providers = ["CPUExecutionProvider"]
        if want_cuda:
            providers = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"]
        self.session = self._create(model, opts, providers, self.source)
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
        rt = ort()
        try:
            if isinstance(model, (str, os.PathLike)):
                return rt.InferenceSession(str(model), opts, providers=providers)
            data = _serialize(model)
            if data is not None:
                return rt.InferenceSession(data, opts, providers=providers)
            return _session_via_file(rt, model, opts, providers)
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


def _serialize(model):
    """The model's bytes, or None when it is over the 2 GB protobuf limit."""
    from scanner.graph.model import over_2gb

    if over_2gb(model):
        return None
    try:
        return model.SerializeToString()
    except Exception:  # noqa: BLE001 - protobuf EncodeError "Failed to serialize proto": over 2 GB
        return None


def _session_via_file(rt, model, opts, providers):
    """A session for a model over 2 GB: saved with external data to a temp folder, opened by path."""
    from scanner.graph.model import saved_by_path

    with saved_by_path(model) as path:
        return rt.InferenceSession(path, opts, providers=providers)
