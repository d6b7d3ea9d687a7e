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


def test_same_config_resumes_silently():
    assert run_config.check_resume(_tree(), _tree()) == []


@pytest.mark.parametrize(
    "key,value",
    [("method", "excb"), ("model.num_prototypes", (13,)), ("batch_size", 32), ("crops.num_crops", (2, 4)),
     ("swav.queue_length", 64), ("optim.base_lr", 0.5), ("seed", 7)],
)
def test_a_changed_run_key_stops_naming_it(key, value):
    with pytest.raises(ConfigError, match=rf"differing keys: {key.replace('.', '[.]')}: .* -> "):
        run_config.check_resume(_tree(), _tree(**{key: value}))


def test_every_differing_key_is_named():
    with pytest.raises(ConfigError) as e:
        run_config.check_resume(_tree(), _tree(**{"model.proj_dim": 8, "method": "excb", "log_every_steps": 5}))
    message = str(e.value)
    assert "model.proj_dim: 16 -> 8" in message and "method: 'swav' -> 'excb'" in message
    assert "log_every_steps:" not in message.split("Resume with")[0]


def test_harmless_changes_and_new_keys_are_allowed_and_noted():
    saved = _tree()
    del saved["logging"]  # a key added to the code after the run started
    notes = run_config.check_resume(
        saved, _tree(**{"log_every_steps": 7, "eval.knn_every_epochs": 2, "data.num_workers": 3})
    )
    assert "log_every_steps: 1 -> 7" in notes
    assert "eval.knn_every_epochs: 0 -> 2" in notes
    assert "data.num_workers: 0 -> 3" in notes
    assert "logging.wandb_project='' (not in the saved config)" in notes


def test_compact_form_has_every_key_once():
    tree = _tree()
    text = run_config.format_compact(tree)
    assert text.splitlines()[0].startswith("config: method=swav ")
    for key, value in run_config.flatten(tree).items():
        assert text.count(f"{key.rpartition('.')[2]}=") >= 1, key
    assert "size_crops=16,8" in text and len(text.splitlines()) == 1 + sum(isinstance(v, dict) for v in tree.values())


def test_train_writes_config_json_and_refuses_a_changed_resume(tmp_path):
    config = tiny_config.get_config()
    train(config, str(tmp_path), max_steps=1)
    with open(tmp_path / "config.json") as f:
        assert json.load(f) == run_config.to_dict(config)

    changed = tiny_config.get_config()
    changed.model.num_prototypes = (24,)
    with pytest.raises(ConfigError, match=r"model.num_prototypes: \[12\] -> \[24\]"):
        train(changed, str(tmp_path), max_steps=2)

    cadence = tiny_config.get_config()
    cadence.log_every_steps = 3
    train(cadence, str(tmp_path), max_steps=1)  # resumes at step 1: nothing left to run
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["log_every_steps"] == 3
