"""Streaming per-channel statistics of activation norms, and the probe score.

Memory stays flat in the number of images: running sums for mean/std, running max, and a fixed-size
reservoir sample (seeded) for quantiles.
"""

import numpy as np

from scanner.graph.instrument import NORMS

QUANTILES = (0.5, 0.9, 0.99)
RESERVOIR_BYTES = 64 << 20
OUTLIER_Z = 3.5
"""Modified z-score above which a channel is marked an outlier (Iglewicz & Hoaglin)."""


class ChannelStats:
    """Per-channel mean, std, max and quantiles of the per-image l-inf, l1, l2 norms."""

    def __init__(self, channels, seed=0, reservoir=1024):
        self.channels = int(channels)
        self.count = 0
        self._sum = {k: np.zeros(self.channels) for k in NORMS}
        self._sq = {k: np.zeros(self.channels) for k in NORMS}
        self._max = {k: np.full(self.channels, -np.inf) for k in NORMS}
        self._ratio = {"linf_over_l1": np.zeros(self.channels), "linf_over_l2": np.zeros(self.channels)}
        self.capacity = max(16, min(reservoir, RESERVOIR_BYTES // max(1, 12 * self.channels)))
        self._sample = {k: np.zeros((self.capacity, self.channels), np.float32) for k in NORMS}
        self._rng = np.random.RandomState(seed)

    def update(self, norms):
        """Add a batch: ``norms[k]`` is an (N, C) array for k in linf, l1, l2."""
        n = len(norms["linf"])
        for k in NORMS:
            v = np.asarray(norms[k], np.float64)
            self._sum[k] += v.sum(0)
            self._sq[k] += (v * v).sum(0)
            self._max[k] = np.maximum(self._max[k], v.max(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            for key, den in (("linf_over_l1", "l1"), ("linf_over_l2", "l2")):
                r = np.where(norms[den] > 0, norms["linf"] / norms[den], 0.0)
                self._ratio[key] += r.sum(0)
        for i in range(n):
            seen = self.count + i
            slot = seen if seen < self.capacity else self._rng.randint(0, seen + 1)
            if slot < self.capacity:
                for k in NORMS:
                    self._sample[k][slot] = norms[k][i]
        self.count += n

    def mean(self, norm="linf"):
        return self._sum[norm] / max(self.count, 1)

    def std(self, norm="linf"):
        m = self.mean(norm)
        return np.sqrt(np.maximum(self._sq[norm] / max(self.count, 1) - m * m, 0.0))

    def summary(self, lo=0, hi=None):
        """Statistics of channels ``lo:hi`` as plain lists (JSON-ready)."""
        sl = slice(lo, hi)
        kept = self._sample[NORMS[0]][: min(self.count, self.capacity)]
        out = {}
        for k in NORMS:
            q = np.quantile(self._sample[k][: len(kept), sl], QUANTILES, axis=0) if len(kept) else None
            out[k] = {
                "mean": _r(self.mean(k)[sl]),
                "std": _r(self.std(k)[sl]),
                "max": _r(self._max[k][sl]),
                **{f"q{int(p * 100)}": _r(q[i]) if q is not None else [] for i, p in enumerate(QUANTILES)},
            }
        for key, v in self._ratio.items():
            out[key] = _r(v[sl] / max(self.count, 1))
        return out


def robust_z(values):
    """(x - median) / (1.4826 * MAD); a spread of 0 falls back to the standard deviation."""
    v = np.asarray(values, np.float64)
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    spread = mad if mad > 1e-12 else v.std()
    if spread <= 1e-12:
        return np.zeros_like(v)
    return (v - med) / spread


def probe_scores(clean, probe, slices):
    """Per-channel score: how much more the probe drives each channel's l-inf than clean images do.

    ``rise = mean_probe(l-inf) - mean_clean(l-inf)``; the score is the rise's robust z-score within its
    layer, so the order inside a layer is the order of the rise and layers can be ranked together.
    """
    rise = probe.mean("linf") - clean.mean("linf")
    score = np.zeros_like(rise)
    for lo, hi in slices:
        score[lo:hi] = robust_z(rise[lo:hi])
    return rise, score


def relative_rise(clean, probe, norm):
    """probe mean / clean mean of a norm, per channel (1 = no change)."""
    c, p = clean.mean(norm), probe.mean(norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c > 0, p / c, np.where(p > 0, np.inf, 1.0))


def _r(a, digits=6):
    """Round to ``digits`` significant digits for stable, compact JSON."""
    a = np.asarray(a, np.float64)
    out = []
    for x in a.tolist():
        if not np.isfinite(x):
            out.append(None)
        elif x == 0:
            out.append(0.0)
        else:
            out.append(float(f"{x:.{digits}g}"))
    return out
