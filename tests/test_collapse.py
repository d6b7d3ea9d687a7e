"""The trainer's collapse watch on made-up metric sequences: which signal fires, when, once;
and across a resume."""

import json
import logging
import math

import tiny_config
from swav_jax.methods import get_method
from swav_jax.train import collapse
from swav_jax.train.collapse import MIN_USED_FRACTION, CollapseWatch
from swav_jax.train.loop import train


def _config(queue=0, method="swav"):
    c = tiny_config.get_config()  # K = 12, batch 16, two assigning crops: 12 usable prototypes
    c.method = method
    c.excb.num_clusters = 12
    c.swav.queue_length = queue
    c.collapse_warning_steps = 30
    return c


def _watch(config):
    return CollapseWatch(config, get_method(config.method), log_every=10)


def _feed(watch, records):
    return [watch.update(r) for r in records]


def _healthy(loss=2.0):
    return {"train/loss": loss, "train/assignment_entropy": math.log(10.0)}


def test_loss_at_log_k_warns_once_after_the_set_number_of_steps():
    watch = _watch(_config())
    stuck = {"train/loss": math.log(12) * 1.005, "train/assignment_entropy": math.log(10.0)}
    messages = _feed(watch, [stuck] * 6)
    assert messages[:2] == [None, None] and messages[3:] == [None] * 3
    assert "ln(K) = 2.485 (within 1%, or above it after having been below) for 30 steps" in messages[2]


def test_a_loss_back_above_log_k_warns_but_one_that_starts_above_it_does_not():
    above = {"train/loss": math.log(12) * 1.10, "train/assignment_entropy": math.log(10.0)}
    # A run's first losses can sit above ln(K) for a while, then come down (docs/QUEUE.md).
    watch = _watch(_config())
    assert _feed(watch, [above] * 6 + [_healthy()] * 3) == [None] * 9
    # Once it has learned, a loss back above ln(K) (predictions worse than uniform: the way
    # into a queue collapse, before the loss settles at ln(K)) counts.
    assert _feed(watch, [above] * 3)[2] is not None


def test_an_interruption_restarts_the_count():
    watch = _watch(_config())
    stuck = {"train/loss": math.log(12), "train/assignment_entropy": math.log(10.0)}
    assert _feed(watch, [stuck, stuck, _healthy(), stuck, stuck]) == [None] * 5
    assert watch.update(stuck) is not None


def test_collapsed_usage_with_a_queue_warns_before_the_loss_and_names_the_queue():
    watch = _watch(_config(queue=64))
    # The batch's codes on one prototype; the loss still far from ln K.
    one = {"train/loss": 1.5, "train/assignment_entropy": 0.0}
    messages = _feed(watch, [one] * 3)
    assert messages[:2] == [None, None]
    assert "about 1.0 of the 12 prototypes" in messages[2] and "swav.queue_length" in messages[2]


def test_usage_threshold_is_a_share_of_the_usable_prototypes():
    # 12 usable prototypes: the threshold is max(5% of 12, 1.5) = 1.5 in effect.
    watch = _watch(_config(queue=64))
    above = {"train/loss": 1.5, "train/assignment_entropy": math.log(1.6)}
    assert _feed(watch, [above] * 5) == [None] * 5
    below = {"train/loss": 1.5, "train/assignment_entropy": math.log(1.4)}
    assert _feed(watch, [below] * 3)[2] is not None
    # 4096 x 2 codes, K = 3000: 5% of 3000 prototypes.
    c = _config(queue=8192)
    c.batch_size, c.model.num_prototypes = 4096, (3000,)
    watch = _watch(c)
    used = MIN_USED_FRACTION * 3000
    assert _feed(watch, [{"train/loss": 5.0, "train/assignment_entropy": math.log(used * 1.01)}] * 5) == [None] * 5
    assert _feed(watch, [{"train/loss": 5.0, "train/assignment_entropy": math.log(used * 0.99)}] * 3)[2] is not None


def test_excb_watches_the_loss_only():
    watch = _watch(_config(method="excb"))
    assert _feed(watch, [{"train/loss": 1.0}] * 5) == [None] * 5
    message = _feed(watch, [{"train/loss": math.log(12)}] * 3)[2]
    assert "excb.num_clusters" in message


def test_the_watch_state_round_trips_and_none_starts_afresh():
    stuck = {"train/loss": math.log(12), "train/assignment_entropy": math.log(10.0)}
    above = {"train/loss": math.log(12) * 1.10, "train/assignment_entropy": math.log(10.0)}
    straight = _watch(_config())
    first = _feed(straight, [_healthy(), stuck, stuck])  # learned; 20 steps at ln(K)
    resumed = _watch(_config())
    resumed.set_state(json.loads(json.dumps(straight.get_state())))  # as a checkpoint keeps it
    assert first == [None] * 3
    assert _feed(resumed, [above]) == _feed(straight, [above])  # the third: warns on both
    assert _feed(resumed, [stuck] * 4) == _feed(straight, [stuck] * 4) == [None] * 4  # once
    fresh = _watch(_config())
    fresh.set_state(None)
    assert _feed(fresh, [above] * 3) == [None] * 3  # never below ln(K): not learned


def test_a_resumed_run_watches_on_from_its_checkpoint(tmp_path, monkeypatch, caplog):
    # A band so wide that every loss counts as "at ln(K)": the loss signal holds at
    # every logged step, and a run warns at its 4th step.
    monkeypatch.setattr(collapse, "LOSS_MARGIN", 10.0)
    config = tiny_config.get_config()
    config.collapse_warning_steps = 4

    def warned(workdir, max_steps):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train(config, str(tmp_path / workdir), max_steps=max_steps)
        return [r.getMessage() for r in caplog.records if "The loss has stayed at ln(K)" in r.getMessage()]

    assert len(warned("straight", 5)) == 1
    assert warned("resumed", 3) == []
    # Saved at step 3 with 3 steps counted: the resumed run warns at step 4, as the
    # straight one did (a watch starting afresh would need steps 4 to 7).
    assert len(warned("resumed", 5)) == 1
