"""Independent float64 NumPy statement of docs/ALGORITHM.md §4-§6, written from docs/ALGORITHM.md.

Deliberately the literal, slow form: the K x N matrix is normalised in place, as the
release does, with no stabilisation (float64 has the range for |S / eps| <= 100).
"""

import numpy as np


def sinkhorn_ref(scores, epsilon, num_iters):
    """scores: [N, K] (all devices' samples). Returns [N, K] float64 codes."""
    q = np.exp(np.asarray(scores, np.float64) / epsilon).T  # K x N
    num_prototypes, num_samples = q.shape
    q /= q.sum()
    for _ in range(num_iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= num_prototypes
        q /= q.sum(axis=0, keepdims=True)
        q /= num_samples
    q *= num_samples
    return q.T


def log_softmax_ref(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def swav_loss_ref(scores, crops_for_assign, temperature, epsilon, num_iters, queue_scores=None):
    """scores: [V, B, K]; queue_scores: [len(crops_for_assign), L, K] or None."""
    scores = np.asarray(scores, np.float64)
    num_views, batch, _ = scores.shape
    loss = 0.0
    for i, a in enumerate(crops_for_assign):
        problem = scores[a]
        if queue_scores is not None:
            problem = np.concatenate([np.asarray(queue_scores[i], np.float64), problem])
        q = sinkhorn_ref(problem, epsilon, num_iters)[-batch:]
        subloss = 0.0
        for v in range(num_views):
            if v == a:
                continue
            subloss -= np.mean(np.sum(q * log_softmax_ref(scores[v] / temperature), axis=1))
        loss += subloss / (num_views - 1)
    return loss / len(crops_for_assign)
