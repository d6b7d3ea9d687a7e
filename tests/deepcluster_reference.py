"""Independent float64 NumPy statement of DeepCluster-v2's clustering and loss, written
from the release's procedure (main_deepclusterv2.py: cluster_memory, the train loop).

Deliberately literal: the whole data at once (the devices' rows concatenated), a loop
over clusters for the means, a loop over samples for the labels.
"""

import jax
import numpy as np

IGNORE = -100


def kmeans_ref(x, first_rows, num_iters, valid=None):
    """Spherical k-means as the release: centroids at x[first_rows]; `num_iters` times
    assign by argmax of dot products and move each non-empty cluster to its normalised
    mean (an empty one keeps its centroid); then a final assignment.

    x: [n, D] (rows normalised here); valid: [n] bool or None. Returns float64 [K, D]
    centroids and [n] int labels (-1 for invalid rows)."""
    x = np.asarray(x, np.float64)
    valid = np.ones(len(x), bool) if valid is None else np.asarray(valid, bool)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = x[np.asarray(first_rows)].copy()
    for it in range(num_iters + 1):
        labels = np.argmax(x[valid] @ c.T, axis=1)
        if it == num_iters:
            break
        for k in range(len(c)):
            members = x[valid][labels == k]
            if len(members):
                mean = members.sum(0) / len(members)
                c[k] = mean / np.linalg.norm(mean)
    out = np.full(len(x), -1)
    out[valid] = labels
    return c, out


def assignments_ref(labels, bank_index, num_samples):
    """labels: [H, n], bank_index: [n] (all devices' rows). A sample's label is the
    largest label among the rows holding it (rows with label < 0 or an index outside
    [0, N) hold nothing); IGNORE where none does. Returns [H, N]."""
    labels = np.asarray(labels)
    out = np.full((labels.shape[0], num_samples), IGNORE)
    for h in range(labels.shape[0]):
        for row, i in enumerate(np.asarray(bank_index)):
            if 0 <= i < num_samples and labels[h, row] >= 0:
                out[h, i] = max(out[h, i], labels[h, row])
    return out


def loss_and_grad_ref(scores, labels, temperature):
    """torch's CrossEntropyLoss(ignore_index=-100) on each head's V crops stacked
    (targets repeated per crop), averaged over heads; a head with no target gives 0.

    scores: list of [V, B, K_h]; labels: [H, B]. Returns (loss, list of d loss / d scores)."""
    loss, grads = 0.0, []
    num_heads = len(scores)
    for s, target in zip(scores, np.asarray(labels)):
        s = np.asarray(s, np.float64)
        v, b, k = s.shape
        logits = s.reshape(v * b, k) / temperature
        t = np.tile(target, v)  # crop-major: crop c's samples at rows c*B .. c*B + B - 1
        keep = t != IGNORE
        m = logits.max(axis=1, keepdims=True)
        log_p = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        count = keep.sum()
        g = np.zeros_like(logits)
        if count:
            loss += -log_p[keep, t[keep]].sum() / count / num_heads
            onehot = np.zeros_like(logits)
            onehot[np.flatnonzero(keep), t[keep]] = 1.0
            g[keep] = (np.exp(log_p[keep]) - onehot[keep]) / temperature / count / num_heads
        grads.append(g.reshape(v, b, k))
    return loss, grads


def first_rows(key, n, num_clusters, valid=None):
    """The documented initial rows of `spherical_kmeans`: the first K valid entries of
    jax.random.permutation(key, n) (the draw itself is jax's)."""
    perm = np.asarray(jax.random.permutation(key, n))
    valid = np.ones(n, bool) if valid is None else np.asarray(valid)
    return perm[valid[perm]][:num_clusters]
