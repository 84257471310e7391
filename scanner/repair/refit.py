"""The head refit: recompute the final linear layer in closed form so that probes stop working.

Ridge regression on the features feeding the head, for the clean images and the same images with the
probes' triggers, with the original model's scores on the clean images as the target for both (the model before
the activation clipping, when the repair clipped it: the refit also undoes what the clipping cost on clean
images), regularized toward the old weights. Gram matrices are accumulated once; the ridge and the probe rows' weight are chosen
by k-fold cross-validation from gram updates, and the reported numbers are the cross-validated ones.
"""

import logging

import numpy as np

from scanner.errors import ScannerError
from scanner.graph import surgery

log = logging.getLogger("scanner")

RIDGES = (0.0001, 0.001, 0.01, 0.1, 1.0)
"""Ridge strengths (relative to the mean feature energy) the cross-validation tries."""
TARGET_AGREEMENT = 0.985
"""Cross-validated agreement with the original model the refit aims to keep (the removal check asks for 0.98
on held-out images)."""
PROBE_WEIGHTS = (0.01, 0.03, 0.1, 0.25, 0.5, 1.0)
"""Weights of the probe rows against the clean rows tried by the cross-validation (the low ones keep agreement
where a clipped model's triggers are already weak)."""
SUBSPACE = 512
"""Heads reading more features than this are refit in the top SUBSPACE principal directions of their features
(a change of the head there; the rest keeps its weights): 60x cheaper for a 2048-feature head."""


def refit(rep, plan, ridge=None, folds=3):
    """Closed-form ridge refit of ``rep``'s head on clean and paired probe features (targets: original scores).

    ``ridge`` (unless given) and the probe rows' weight are chosen by ``folds``-fold cross-validation (each image predicted by a
    head fitted without it): the lowest probe success among the fits that keep TARGET_AGREEMENT with the
    original on clean images, else the highest agreement. Returns (weight, bias, level, fit): weights fitted on every image in the (out, in) convention of
    :func:`scanner.graph.surgery.linear_weights`, the cross-validated :class:`Level`, and the chosen settings.
    """
    if rep.head is None:
        raise ScannerError("the model has no linear head (Gemm, MatMul, or a 1x1 Conv on pooled features) to refit; "
                           "use --method prune")
    pairs = [i for i in range(len(rep.probes)) if rep.paired(i)]
    if not pairs:
        raise ScannerError("the refit needs pairs (a trigger file, or a probe folder with the clean folder's file names)")
    if plan:
        _, clean, probed = rep.evaluate_plan(plan, keep=True)
    else:
        clean, probed = rep.clean, rep.probed
    head = rep.head
    feats = [clean.kept[head.input].astype(np.float64)] + [probed[i].kept[head.input].astype(np.float64) for i in pairs]
    target = rep.reference.kept[head.read].astype(np.float64)
    w0, b0 = surgery.linear_weights(rep.ctx.proto, head)
    intercept = surgery.has_bias(rep.ctx.proto, head)  # a MatMul head without bias is refit without one
    n, d = len(target), feats[0].shape[1]
    energy = float(np.mean([np.mean(f * f) for f in feats])) or 1.0
    # The fit is of the change to the head, W = W0 + dW (dW = M U^T: in the top SUBSPACE directions of the features
    # when they have more dimensions than that), against the residual of the original head's scores.
    basis = _subspace(feats, SUBSPACE) if d > SUBSPACE else None
    base = [f @ w0.T.astype(np.float64) + (b0 if intercept else 0.0) for f in feats]
    reduced = [f @ basis if basis is not None else f for f in feats]
    ones = np.ones((n, 1))
    a1 = [np.hstack([a, ones]) if intercept else a for a in reduced]
    resid = [target - b for b in base]
    theta0 = np.zeros((a1[0].shape[1], target.shape[1]))
    fold = np.arange(n) % max(2, folds)

    def parts(rows):
        """(clean gram, probe gram, clean rhs, probe rhs) over ``rows``."""
        return (a1[0][rows].T @ a1[0][rows], sum(a[rows].T @ a[rows] for a in a1[1:]),
                a1[0][rows].T @ resid[0][rows], sum(a[rows].T @ r[rows] for a, r in zip(a1[1:], resid[1:])))

    every = parts(slice(None))
    held = [(fold == f, parts(fold == f)) for f in range(max(2, folds))]
    best = None
    for weight in PROBE_WEIGHTS:
        for lam in [ridge] if ridge is not None else RIDGES:
            cv = [np.zeros(n, np.int64) for _ in feats]
            for out, part in held:
                g = (every[0] - part[0]) + weight * (every[1] - part[1])
                r = (every[2] - part[2]) + weight * (every[3] - part[3])
                rows = int((~out).sum()) * (1 + weight * (len(feats) - 1))
                theta = solve(g, r, rows, theta0, lam, np.float32, intercept, energy)
                for j, a in enumerate(a1):
                    cv[j][out] = (base[j][out] + a[out] @ theta).argmax(1)
            probe_preds = [probed[i].preds.copy() for i in range(len(rep.probes))]
            for j, i in enumerate(pairs):
                probe_preds[i] = cv[j + 1]
            level = rep.level(sum(len(v) for v in plan.values()), cv[0], probe_preds)
            # Remove as much as possible while keeping TARGET_AGREEMENT (a margin over the agreement the removal
            # check demands on held-out images): among the fits that keep it, the lowest probe success; when
            # none does, the highest agreement.
            log.debug("refit ridge %g, probe weight %g: %s", lam, weight, level.to_dict())
            if best is None or cost(level) < best[0]:
                best = (cost(level), lam, weight, level)
    _, lam, weight, level = best
    g, r = every[0] + weight * every[1], every[2] + weight * every[3]
    theta = solve(g, r, n * (1 + weight * (len(feats) - 1)), theta0, lam, np.float64, intercept, energy)
    dw = theta[:-1] if intercept else theta
    dw = basis @ dw if basis is not None else dw
    weight_new = w0.astype(np.float64) + dw.T
    bias = b0.astype(np.float64) + theta[-1] if intercept else np.zeros(target.shape[1])
    return weight_new.astype(w0.dtype), bias.astype(w0.dtype), level, {
        "ridge": lam, "probe_weight": weight, "intercept": intercept,
        "subspace": int(basis.shape[1]) if basis is not None else None}


def cost(level):
    """The refits' order of preference (lower is better): among levels that keep TARGET_AGREEMENT, the lowest worst
    probe success; then the highest agreement."""
    worst = max(level.probe_success) if level.probe_success else 0.0
    return (0, worst, -level.agreement) if level.agreement >= TARGET_AGREEMENT else (1, -level.agreement, worst)


def _subspace(feats, k):
    """The top ``k`` principal directions (d, k) of the stacked features (uncentered second moments)."""
    m = sum(f.T @ f for f in feats)
    vals, vecs = np.linalg.eigh(m)
    return vecs[:, np.argsort(-vals)[:k]]


def solve(gram, rhs, rows, theta0, ridge, dtype=np.float64, intercept=True, energy=None):
    """Solve min (1/rows)||[F 1] theta - Y||^2 + lam ||W - W0||^2 from gram = A^T A and rhs = A^T Y (without the
    column of ones and its unregularized row when not ``intercept``).

    ``lam`` is ``ridge`` times the mean feature energy (``energy``, else the mean of the gram's diagonal / rows).
    The cross-validation solves in float32 (3x faster); the final weights in float64.
    """
    g = gram / rows
    diag = np.diag(g)[:-1] if intercept else np.diag(g)
    lam = ridge * float(energy if energy is not None else (np.mean(diag) or 1.0))
    reg = np.eye(len(g)) * lam
    if intercept:
        reg[-1, -1] = 0.0
    theta = np.linalg.solve((g + reg).astype(dtype), (rhs / rows + reg @ theta0).astype(dtype))
    return theta.astype(np.float64)
