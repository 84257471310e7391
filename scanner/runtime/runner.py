"""The one place a model runs over pixels: scores, and per-channel norms or features when asked.

A :class:`Runner` owns an onnxruntime session of a model (instrumented when norms, masks or features are
asked for). Every stage runs images through one: the scan, trigger synthesis, evaluation, the repair and
the HTML audit. Pixels are (N, H, W, C) 0-255 arrays at the model's size and color order; the runner
preprocesses them, runs them in chunks, counts the forward passes (``queries``) and advances a progress bar.
"""

from dataclasses import dataclass, field

import numpy as np

from scanner.graph.instrument import NORMS, instrument
from scanner.runtime.session import Detached, Session, detach, wants_cuda


@dataclass
class Output:
    """What one run gives: the scores output (N, K), norms {norm: (N, C)} and features {tensor: (N, F)}."""

    scores: np.ndarray
    norms: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)

    @property
    def preds(self):
        return self.scores.argmax(1)


def probabilities(scores):
    """Class probabilities (N, K) from a scores output: kept when they already are probabilities (a Softmax
    output), else a softmax of the logits, in the scores' own float type."""
    z = np.asarray(scores)
    if z.min() >= 0 and z.max() <= 1 and np.allclose(z.sum(1), 1, atol=1e-3):
        return z
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


TAP_BYTES = 32 << 20
"""The most bytes one session call's images fill in the largest measured map: a batch past it runs as smaller
session calls. The norm nodes read each map three or four times and onnxruntime keeps an NCHW copy of it beside its
blocked one; smaller maps stay in cache between those reads and take less memory, and the convolutions lose nothing
measurable at these sizes (benchmarks/RESULTS.md, "Scan, search and evaluation against plain onnxruntime")."""


CALL_BYTES = 4 << 20
"""On CPU, the most bytes one session call's images fill in the model's largest map: a batch past it runs as smaller
session calls. Past a few MiB per tensor the maps leave the caches and plain onnxruntime's throughput falls with the
batch: batch 512 of the 32x32 zoo runs 7-20% slower than 64, batch 111 of a 224x224 ResNet-50 or MobileNetV3 12-18%
slower than 4 (benchmarks/RESULTS.md, "Session calls sized by the largest map")."""
CALL_MIN = 4
"""Images one CPU session call gets at least, however large the maps: the 224x224 models run as fast at 4 images per
call as at 16-64; 2 images ran 3-4% slower than 4 on ResNet-18 and MobileNetV3 in a trial run."""


def _within(batch, per_image, budget, least):
    """``batch``, or as many images (at least ``least``) as fill ``budget`` bytes at ``per_image`` bytes each (0 or
    None: unknown, no limit)."""
    if not per_image:
        return int(batch)
    return int(min(batch, max(least, budget // int(per_image))))


def call_images(map_bytes, batch):
    """Images per CPU session call of a model whose largest map of one image is ``map_bytes``: ``batch``, or fewer
    where that many would fill more than :data:`CALL_BYTES` (at least :data:`CALL_MIN`; 0 or None: unknown, no
    limit)."""
    return _within(batch, map_bytes, CALL_BYTES, CALL_MIN)


def tap_batch(layers, batch):
    """Images per session call when the norms of ``layers`` are measured: ``batch``, or fewer where the largest
    measured float32 map of that many images would be over :data:`TAP_BYTES` (at least 1; maps of unknown size do
    not count)."""
    sizes = [l.channels * int(np.prod(l.spatial)) * 4 for l in layers
             if l.spatial and all(isinstance(d, int) and d > 0 for d in l.spatial)]
    return _within(batch, max(sizes, default=0), TAP_BYTES, 1)


class Runner:
    """Forward passes of one model (a ModelProto) on pixel batches.

    ``layers`` and ``norms`` (a subset of :data:`NORMS`) add in-graph per-channel norms; ``masks`` adds a
    channel-mask input per layer (prune sweeps); ``features`` exposes tensors (their values come back
    flattened per image). ``batch_size`` is the chunk one session call gets: fewer images on CPU where the model's
    largest map of one image, ``map_bytes``, would fill more than CALL_BYTES (:func:`call_images`), and where the
    measured maps are large (:func:`tap_batch`).
    """

    def __init__(self, proto, pre, scores, layers=(), norms=(), masks=False, features=(), device="auto", threads=None,
                 batch_size=256, source=None, map_bytes=None):
        self.pre, self.scores_name, self.batch_size = pre, scores, int(batch_size)
        self.layers = list({l.id: l for l in layers}.values())
        self.norm_kinds = tuple(k for k in NORMS if k in tuple(norms)) if self.layers else ()
        self.instrumented = None
        if self.norm_kinds or (masks and self.layers) or features:
            kernels = "pool" if wants_cuda(device) else "reduce"  # the fast kernels differ
            detached = detach(proto)  # instrument the graph alone: the weights go to onnxruntime beside it
            self.instrumented = instrument(detached.skeleton, self.layers, norms=self.norm_kinds, masks=masks,
                                           features=features, kernels=kernels)
            proto = Detached(self.instrumented.model, detached.weights)
            self.instrumented.model = None  # onnxruntime makes its own copy: ours would only be memory
        self.source = source
        # the memory pattern plans one block for every map alive at once: with the norm nodes it only costs memory
        self.session = Session(proto, device=device, threads=threads, source=source, memory_pattern=self.instrumented is None)
        del proto
        self.map_bytes = map_bytes if self.session.provider == "CPUExecutionProvider" else None
        self.slices = [self.instrumented.slices[l.id] for l in self.layers] if self.instrumented else []
        self.channels = sum(hi - lo for lo, hi in self.slices)
        self.features = tuple(features)
        self.queries = 0
        self._input = None
        self.progress = None
        """A :class:`scanner.progress.Progress` advanced by every image run, when set."""

    @property
    def provider(self):
        return self.session.provider

    def mask_feeds(self, masks=None):
        """Feeds for the mask inputs: all ones, then ``masks[layer id]`` (a 0/1 vector) where given."""
        feeds = {}
        inputs = self.instrumented.mask_inputs if self.instrumented else {}
        for layer in self.layers:
            name = inputs.get(layer.id)
            if name is not None:
                m = np.ones(layer.channels, np.float32)
                if masks and layer.id in masks:
                    m = np.asarray(masks[layer.id], np.float32)
                feeds[name] = m
        return feeds

    def call_size(self, batch_size=None, norms=True):
        """Images one session call gets when :meth:`run` is given ``batch_size`` (default: the runner's) and
        ``norms``: :func:`call_images` on CPU, then :func:`tap_batch` where norms are measured."""
        step = call_images(self.map_bytes, batch_size or self.batch_size)
        return tap_batch(self.layers, step) if norms and self.norm_kinds else step

    def run(self, pixels, masks=None, norms=True, features=True, batch_size=None, flatten=True):
        """Run ``pixels`` (N, H, W, C); ``norms`` / ``features`` False leave those outputs out (faster);
        ``flatten`` False keeps the features' own shapes."""
        names = [self.scores_name]
        if norms and self.norm_kinds:
            names += [self.instrumented.norm_outputs[k] for k in self.norm_kinds]
        if features:
            names += [f for f in self.features if f not in names]
        feeds = self.mask_feeds(masks)
        step = self.call_size(batch_size, norms)
        parts = {name: [] for name in names}
        for s in range(0, len(pixels), step):
            chunk = pixels[s : s + step]
            self._input = self.pre.to_tensor(chunk, self._input)  # one input buffer, reused batch after batch
            out = self.session.run(self._input, names, feeds)
            for name in names:
                keep_shape = not flatten and name in self.features and name != self.scores_name
                parts[name].append(out[name] if keep_shape else out[name].reshape(len(chunk), -1))
            self.queries += len(chunk)
            if self.progress is not None:
                self.progress.advance(len(chunk))
        joined = {name: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for name, v in parts.items()}
        result = Output(joined[self.scores_name].astype(np.float32))
        if norms and self.norm_kinds:
            result.norms = {k: joined[self.instrumented.norm_outputs[k]] for k in self.norm_kinds}
        if features:
            result.features = {f: joined[f] for f in self.features}
        return result

    def predict(self, images, trigger=None, label="eval"):
        """(predicted classes, labels or None) of an image set, ``trigger`` stamped on when given; progress on stderr."""
        from scanner.progress import Progress

        preds, labels = [], []
        saved = self.progress
        with Progress(len(images), label) as bar:
            self.progress = bar
            try:
                for batch, out in self.stream(images, trigger, norms=False, features=False):
                    preds.append(out.preds)
                    if batch.labels is not None:
                        labels.append(batch.labels)
            finally:
                self.progress = saved
        return np.concatenate(preds), (np.concatenate(labels) if labels else None)

    def stream(self, images, trigger=None, masks=None, norms=True, features=True, batch_size=None):
        """Yield (Batch, Output) over an image set, ``trigger`` stamped on each batch when given."""
        step = int(batch_size or self.batch_size)
        start = 0  # a trigger at random positions draws them from the image's index in the whole set
        for batch in images.batches(self.pre, step):
            pixels = batch.pixels if trigger is None else trigger.apply(batch.pixels, color=self.pre.color, start=start)
            start += len(batch.pixels)
            yield batch, self.run(pixels, masks, norms, features, step)
