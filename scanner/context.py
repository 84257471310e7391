"""The model context: one model as every stage sees it, made once per command.

The loader chain, each step a small function of its own:

file -> read and validate (:func:`scanner.graph.model.load_model`) -> fold constant subgraphs
(:func:`scanner.graph.fold.fold_constants`, checked against the original) -> a fixed batch of 1 made dynamic
when the outputs allow it (:func:`scanner.graph.cost.dynamic_batch`) -> choose the scores output
(:func:`scanner.graph.model.scores_output`) -> discover layers (:func:`scanner.graph.layers.discover`, every
left-out node named) -> preprocessing (:func:`scanner.data.preprocess.resolve_preprocess`) -> runners
(onnxruntime sessions).

Nothing below a command resolves preprocessing or discovers layers again: stages take the context. A repaired
model (same graph, new weights) gets a :meth:`ModelContext.derived` context with the same layers and
preprocessing; an edited graph (a cut branch) a :meth:`ModelContext.rebuilt` one.
"""

import logging

from scanner.data.preprocess import resolve_preprocess
from scanner.graph.cost import dynamic_batch, largest_map
from scanner.graph.fold import fold_constants
from scanner.graph.layers import discover, select
from scanner.graph.model import ModelFile, load_model, scores_output
from scanner.runtime.runner import Runner

log = logging.getLogger("scanner")


class ModelContext:
    """A loaded model with its layers, preprocessing, scores output and runtime settings."""

    def __init__(self, model, preprocess, layers, scores, device="auto", threads=None, batch_size=128, proto=None,
                 skipped=(), folded=None, batch_made_dynamic=False, map_bytes=None):
        self.model = model
        self.preprocess = preprocess
        self.layers = list(layers)
        self.scores = scores
        self.device, self.threads, self.batch_size = device, threads, batch_size
        self.proto = proto if proto is not None else model.proto
        self.skipped = list(skipped)
        self.folded = folded
        self.batch_made_dynamic = batch_made_dynamic
        self._audit = None
        self._map_bytes = map_bytes

    @classmethod
    def open(cls, model, preprocess=None, device="auto", threads=None, batch_size=128, scores=None):
        """Run the loader chain on ``model`` (a path or a ModelFile). ``preprocess``: a preset name or a JSON file;
        ``scores``: the name of the output holding the class scores (default: chosen, see ``scores_output``)."""
        mf = model if isinstance(model, ModelFile) else load_model(model)
        mf.facts()  # of the file as read, before an in-place fold
        proto, folded = fold_constants(mf.proto, mf.path, inplace=not isinstance(model, ModelFile))
        proto, dynamic = dynamic_batch(proto, mf.path)
        name = scores_output(mf, scores)
        skipped = []
        layers = discover(proto, skipped)
        for s in skipped:
            log.warning("%s: layer %s (%s) left out: %s", mf.path, s["node"], s["op_type"], s["reason"])
        pre = resolve_preprocess(mf.input.shape, mf.input.dtype, mf.metadata, preprocess, source=mf.path)
        return cls(mf, pre, layers, name, device, threads, batch_size, proto, skipped, folded, dynamic)

    @property
    def path(self):
        return self.model.path

    def facts(self):
        """Model facts for reports: the file's, and what the loader chain made of it."""
        return {**self.model.facts(), "scores": self.scores, "folded": self.folded, "skipped_layers": self.skipped,
                "batch_made_dynamic": self.batch_made_dynamic, "preprocess_sources": list(self.preprocess.sources),
                "preprocess_assumed": self.preprocess.assumed}

    def for_writing(self, proto):
        """``proto`` as it is written: with the file's fixed batch of 1 back when the chain made it dynamic."""
        if not self.batch_made_dynamic:
            return proto
        from scanner.graph.layers import copy_model

        m = copy_model(proto)
        for vi in [v for v in m.graph.input if v.name == self.model.input.name] + list(m.graph.output):
            d = vi.type.tensor_type.shape.dim
            if d and d[0].dim_param == "N":
                d[0].Clear()
                d[0].dim_value = 1
        return m

    def select(self, spec):
        """The layers named by ``spec`` (``last``, ``all`` or ids; see :func:`scanner.graph.layers.select`)."""
        return select(self.layers, spec)

    @property
    def head(self):
        """The last linear layer that feeds the scores through pass-through ops only, or None."""
        heads = [l for l in self.layers if l.is_head]
        return heads[-1] if heads else None

    @property
    def map_bytes(self):
        """Bytes of the largest map one image fills in this graph (:func:`scanner.graph.cost.largest_map`), or 0
        when no shape is known; computed once."""
        if self._map_bytes is None:
            self._map_bytes = largest_map(self.proto) or 0
        return self._map_bytes

    def runner(self, layers=(), norms=(), masks=False, features=(), batch_size=None, device=None):
        """A :class:`Runner` of this model, instrumented for ``layers`` / ``norms`` / ``masks`` / ``features``."""
        return Runner(self.proto, self.preprocess, self.scores, layers, norms, masks, features,
                      device or self.device, self.threads, batch_size or self.batch_size, self.model.path,
                      map_bytes=self.map_bytes)

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
                            self.batch_size, proto, self.skipped, self.folded, self.batch_made_dynamic)

    def derived(self, proto):
        """The context of a repaired copy of this model (same graph, new weights): same layers and preprocessing."""
        return ModelContext(self.model, self.preprocess, self.layers, self.scores, self.device, self.threads,
                            self.batch_size, proto, self.skipped, self.folded, self.batch_made_dynamic,
                            self._map_bytes)
