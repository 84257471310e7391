"""The model context: one model as every stage sees it, made once per command.

file -> validated proto (:func:`scanner.graph.model.load_model`) -> layers (:func:`scanner.graph.layers.discover`)
-> preprocessing (:func:`scanner.data.preprocess.resolve_preprocess`) -> runners (onnxruntime sessions).
Nothing below a command resolves preprocessing or discovers layers again: stages take the context. A repaired
model (same graph, new weights) gets a :meth:`ModelContext.derived` context with the same layers and
preprocessing.
"""

from scanner.data.preprocess import resolve_preprocess
from scanner.graph.layers import discover, select
from scanner.graph.model import ModelFile, load_model
from scanner.runtime.runner import Runner


class ModelContext:
    """A loaded model with its layers, preprocessing, scores output and runtime settings."""

    def __init__(self, model, preprocess, layers, scores, device="auto", threads=None, batch_size=128, proto=None):
        self.model = model
        self.preprocess = preprocess
        self.layers = list(layers)
        self.scores = scores
        self.device, self.threads, self.batch_size = device, threads, batch_size
        self.proto = proto if proto is not None else model.proto
        self._audit = None

    @classmethod
    def open(cls, model, preprocess=None, device="auto", threads=None, batch_size=128):
        """Load ``model`` (a path or a ModelFile), resolve its preprocessing (``preprocess``: a JSON file or
        None) and discover its layers."""
        mf = model if isinstance(model, ModelFile) else load_model(model)
        pre = resolve_preprocess(mf.input.shape, mf.input.dtype, mf.metadata, preprocess, source=mf.path)
        return cls(mf, pre, discover(mf.proto), mf.outputs[0].name, device, threads, batch_size)

    @property
    def path(self):
        return self.model.path

    def select(self, spec):
        """The layers named by ``spec`` (``last``, ``all`` or ids; see :func:`scanner.graph.layers.select`)."""
        return select(self.layers, spec)

    @property
    def head(self):
        """The last layer that feeds the scores through pass-through ops only (Gemm/MatMul), or None."""
        heads = [l for l in self.layers if l.is_head]
        return heads[-1] if heads else None

    def runner(self, layers=(), norms=(), masks=False, features=(), batch_size=None, device=None):
        """A :class:`Runner` of this model, instrumented for ``layers`` / ``norms`` / ``masks`` / ``features``."""
        return Runner(self.proto, self.preprocess, self.scores, layers, norms, masks, features,
                      device or self.device, self.threads, batch_size or self.batch_size, self.model.path)

    @property
    def audit(self):
        """The graph audit of this model (:func:`scanner.graph.audit.audit`), computed once."""
        if self._audit is None:
            from scanner.graph.audit import audit

            self._audit = audit(self.proto, self.scores)
        return self._audit

    def rebuilt(self, proto):
        """The context of an edited graph (a cut branch): its layers are discovered again; same preprocessing."""
        return ModelContext(self.model, self.preprocess, discover(proto), self.scores, self.device, self.threads,
                            self.batch_size, proto)

    def derived(self, proto):
        """The context of a repaired copy of this model (same graph, new weights): same layers and preprocessing."""
        return ModelContext(self.model, self.preprocess, self.layers, self.scores, self.device, self.threads,
                            self.batch_size, proto)
