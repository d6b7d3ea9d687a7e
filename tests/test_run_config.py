"""WORKDIR/config.json: written at start, and a resume with another config stops naming
the keys that differ, unless only harmless keys changed."""

import json

import pytest

import tiny_config
from swav_jax.errors import ConfigError
from swav_jax.train import run_config
from swav_jax.train.loop import train


def _tree(**changes):
    config = tiny_config.get_config()
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        target = config[section] if section else config
        with config.unlocked():
            target[name] = value
    return run_config.to_dict(config)


SHAPES = {"params/w": (3, 4)}


def _check(saved, current, current_shapes=SHAPES):
    return run_config.check_resume(saved, current, saved_shapes=SHAPES, current_shapes=current_shapes)


def test_same_config_resumes_silently():
    assert _check(_tree(), _tree()) == ([], [])


@pytest.mark.parametrize("key,value", [("model.num_prototypes", (13,)), ("crops.num_crops", (2, 4)),
                                       ("swav.queue_length", 64)])
def test_a_key_that_changes_shapes_stops_naming_it(key, value):
    with pytest.raises(ConfigError, match=rf"changes the shapes of the state; differing keys: {key.replace('.', '[.]')}: .* -> "):
        _check(_tree(), _tree(**{key: value}), current_shapes={"params/w": (3, 5)})


def test_a_changed_method_stops_naming_every_differing_key():
    with pytest.raises(ConfigError) as e:
        _check(_tree(), _tree(**{"model.proj_dim": 8, "method": "excb", "log_every_steps": 5}))
    message = str(e.value)
    assert "changes the method" in message
    assert "model.proj_dim: 16 -> 8" in message and "method: 'swav' -> 'excb'" in message
    assert "log_every_steps" not in message  # harmless


def test_shapes_that_differ_under_the_same_config_are_named():
    with pytest.raises(ConfigError, match=r"no config key differs, but .* params/w: \(3, 4\) -> \(3, 5\)"):
        _check(_tree(), _tree(), current_shapes={"params/w": (3, 5)})


def test_other_changes_are_allowed_harmless_ones_noted_the_rest_warned():
    saved = _tree()
    del saved["logging"]  # a key added to the code after the run started
    notes, warnings = _check(saved, _tree(**{"log_every_steps": 7, "eval.knn_every_epochs": 2,
                                             "data.num_workers": 3, "epochs": 4, "optim.base_lr": 0.5}))
    assert notes == [
        "data.num_workers: 0 -> 3",
        "eval.knn_every_epochs: 0 -> 2",
        "log_every_steps: 1 -> 7",
        "logging.wandb_project='' (not in the saved config)",
    ]
    assert warnings == ["epochs: 1 -> 4", "optim.base_lr: 1.5 -> 0.5"]


def test_compact_form_has_every_key_once():
    tree = _tree()
    text = run_config.format_compact(tree)
    assert text.splitlines()[0].startswith("config: method=swav ")
    for key, value in run_config.flatten(tree).items():
        assert text.count(f"{key.rpartition('.')[2]}=") >= 1, key
    assert "size_crops=16,8" in text and len(text.splitlines()) == 1 + sum(isinstance(v, dict) for v in tree.values())


@pytest.mark.slow
def test_train_writes_config_json_and_refuses_a_changed_resume(tmp_path):
    config = tiny_config.get_config()
    train(config, str(tmp_path), max_steps=1)
    with open(tmp_path / "config.json") as f:
        assert json.load(f) == run_config.to_dict(config)

    changed = tiny_config.get_config()
    changed.model.num_prototypes = (24,)
    with pytest.raises(ConfigError, match=r"shapes of the state; differing keys: model.num_prototypes: \[12\] -> \[24\]"):
        train(changed, str(tmp_path), max_steps=2)

    # Same shapes: a harmless change and a schedule change resume (at step 1: nothing left to run).
    other = tiny_config.get_config()
    other.log_every_steps = 3
    other.epochs = 2
    train(other, str(tmp_path), max_steps=1)
    with open(tmp_path / "config.json") as f:
        recorded = json.load(f)
    assert recorded["log_every_steps"] == 3 and recorded["epochs"] == 2
