"""The trainer's collapse watch: warns once when the logged metrics say the run collapsed.

Two signals, each read on the logged steps and required to hold for
`config.collapse_warning_steps` consecutive steps:

  loss    the loss within 1% of ln(K): predictions uniform over the K prototypes
          (clusters), the state a collapsed model settles in; or, once the loss has been
          below that band, anywhere above its lower edge: on the way into a collapse the
          codes can land where the predictions are not (SwAV's batch pushed onto the
          prototypes a stale queue leaves free) and the loss goes above ln(K) first. Not
          above it from the start: a run's first loss can be well above ln(K) and come
          down slowly (docs/QUEUE.md). Every method.
  usage   the step's codes pick, by argmax, fewer than `MIN_USED_FRACTION` of the
          prototypes they could in effect: exp(train/assignment_entropy) below that share
          of `Method.usage_watch`'s usable count. SwAV only: without a queue Sinkhorn
          balances the codes over the batch itself, so this does not happen; with a queue
          it balances them over the queue and the batch together, and a batch whose
          embeddings drifted away from the queue's can put all its codes on one prototype.
          The loss reaches ln(K) only later, once the queue holds the collapsed embeddings.
"""

from __future__ import annotations

import math

import ml_collections

# The usage signal fires below this share of the usable prototypes in effect. Healthy runs
# measured on the digits and CIFAR images (with or without a queue) stayed above 10%; a
# collapsed batch uses one prototype.
MIN_USED_FRACTION = 0.05
# The loss signal's band around ln(K), as a share of ln(K).
LOSS_MARGIN = 0.01


class CollapseWatch:
    """Feed it every logged step's host metrics; `update` returns a warning once.

    Args:
      config: the run's config (collapse_warning_steps and what `method` reads).
      method: the run's `swav_jax.methods` Method (num_clusters, collapse_hint, usage_watch).
      log_every: steps between logged steps (each logged step stands for this many).
    """

    def __init__(self, config: ml_collections.ConfigDict, method, log_every: int):
        self._needed = int(config.collapse_warning_steps)
        self._num_clusters = method.num_clusters(config)
        self._log_k = math.log(self._num_clusters)
        self._loss_hint = method.collapse_hint(config)
        self._usage = method.usage_watch(config)  # (usable prototypes, hint) or None
        self._log_every = log_every
        self._steps = {"loss": 0, "usage": 0}
        self._warned = False
        self._learned = False  # the loss has been below the band around ln(K)

    def get_state(self) -> dict:
        """JSON-able counters, saved with each checkpoint so that a resumed run watches on."""
        return {"steps": dict(self._steps), "warned": self._warned, "learned": self._learned}

    def set_state(self, state: dict | None) -> None:
        """Continue from `get_state`'s dict; None (a checkpoint saved without one) starts afresh."""
        if state is None:
            return
        self._steps = {signal: int(state["steps"][signal]) for signal in self._steps}
        self._warned, self._learned = bool(state["warned"]), bool(state["learned"])

    def update(self, metrics: dict[str, float]) -> str | None:
        """The warning message the first time a signal has held long enough, else None."""
        loss = metrics["train/loss"]
        low, high = (1 - LOSS_MARGIN) * self._log_k, (1 + LOSS_MARGIN) * self._log_k
        self._learned = self._learned or loss <= low
        held = {"loss": low < loss and (loss < high or self._learned)}
        used = None
        if self._usage is not None and "train/assignment_entropy" in metrics:
            used = math.exp(metrics["train/assignment_entropy"])
            held["usage"] = used < max(MIN_USED_FRACTION * self._usage[0], 1.5)
        for signal in self._steps:
            self._steps[signal] = self._steps[signal] + self._log_every if held.get(signal) else 0
        if self._warned:
            return None
        if self._steps["usage"] >= self._needed:
            self._warned = True
            return (
                f"The codes of each batch have used about {used:.1f} of the {self._num_clusters} "
                f"prototypes for {self._steps['usage']} steps: {self._usage[1]}"
            )
        if self._steps["loss"] >= self._needed:
            self._warned = True
            return (
                f"The loss has stayed at ln(K) = {self._log_k:.3f} (within 1%, or above it after "
                f"having been below) for {self._steps['loss']} steps: {self._loss_hint}"
            )
        return None
