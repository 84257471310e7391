"""The head refit: recompute the final linear layer in closed form so that probes stop working.

Ridge regression on the features feeding the head, for the clean images and the same images with the
probes' triggers, with the original model's scores on the clean images as the target for both, regularized
toward the old weights. Gram matrices are accumulated once; the ridge and the probe rows' weight are chosen
by k-fold cross-validation from gram updates, and the reported numbers are the cross-validated ones.
"""

import logging

import numpy as np

from scanner.errors import ScannerError
from scanner.graph import surgery

log = logging.getLogger("scanner")

RIDGES = (0.001, 0.01, 0.1, 1.0)
"""Ridge strengths (relative to the mean feature energy) the cross-validation tries."""
TARGET_AGREEMENT = 0.985
"""Cross-validated agreement with the original model the refit aims to keep (the removal check asks for 0.98
on held-out images)."""
PROBE_WEIGHTS = (0.1, 0.25, 0.5, 1.0)
"""Weights of the probe rows against the clean rows tried by the cross-validation."""


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
    feats = [clean.kept[head.input]] + [probed[i].kept[head.input] for i in pairs]
    target = rep.clean.kept[head.read].astype(np.float64)
    w0, b0 = surgery.linear_weights(rep.ctx.proto, head)
    intercept = surgery.has_bias(rep.ctx.proto, head)  # a MatMul head without bias is refit without one
    theta0 = (np.vstack([w0.T, b0[None, :]]) if intercept else w0.T).astype(np.float64)
    n = len(target)
    fold = np.arange(n) % max(2, folds)
    ones = np.ones((n, 1))
    a1 = [np.hstack([a.astype(np.float64), ones]) if intercept else a.astype(np.float64) for a in feats]

    def parts(rows):
        """(clean gram, probe gram, clean rhs, probe rhs) over ``rows``."""
        return (a1[0][rows].T @ a1[0][rows], sum(a[rows].T @ a[rows] for a in a1[1:]),
                a1[0][rows].T @ target[rows], sum(a[rows].T @ target[rows] for a in a1[1:]))

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
                theta = solve(g, r, rows, theta0, lam, np.float32, intercept)
                for j, a in enumerate(a1):
                    cv[j][out] = (a[out] @ theta).argmax(1)
            probe_preds = [probed[i].preds.copy() for i in range(len(rep.probes))]
            for j, i in enumerate(pairs):
                probe_preds[i] = cv[j + 1]
            level = rep.level(sum(len(v) for v in plan.values()), cv[0], probe_preds)
            # Remove as much as possible while keeping TARGET_AGREEMENT (a margin over the agreement the removal
            # check demands on held-out images): among the fits that keep it, the lowest probe success; when
            # none does, the highest agreement.
            worst = max(level.probe_success) if level.probe_success else 0.0
            cost = (0, worst, -level.agreement) if level.agreement >= TARGET_AGREEMENT else (1, -level.agreement, worst)
            log.debug("refit ridge %g, probe weight %g: %s", lam, weight, level.to_dict())
            if best is None or cost < best[0]:
                best = (cost, lam, weight, level)
    _, lam, weight, level = best
    g, r = every[0] + weight * every[1], every[2] + weight * every[3]
    theta = solve(g, r, n * (1 + weight * (len(feats) - 1)), theta0, lam, np.float64, intercept)
    bias = theta[-1] if intercept else np.zeros(theta.shape[1])
    return (theta[:-1] if intercept else theta).T.astype(w0.dtype), bias.astype(w0.dtype), level, {
        "ridge": lam, "probe_weight": weight, "intercept": intercept}


def solve(gram, rhs, rows, theta0, ridge, dtype=np.float64, intercept=True):
    """Solve min (1/rows)||[F 1] theta - Y||^2 + lam ||W - W0||^2 from gram = A^T A and rhs = A^T Y (without the
    column of ones and its unregularized row when not ``intercept``).

    ``lam`` is ``ridge`` times the mean feature energy (the mean of the gram's diagonal / rows).
    The cross-validation solves in float32 (3x faster); the final weights in float64.
    """
    g = gram / rows
    diag = np.diag(g)[:-1] if intercept else np.diag(g)
    lam = ridge * float(np.mean(diag) or 1.0)
    reg = np.eye(len(g)) * lam
    if intercept:
        reg[-1, -1] = 0.0
    theta = np.linalg.solve((g + reg).astype(dtype), (rhs / rows + reg @ theta0).astype(dtype))
    return theta.astype(np.float64)
