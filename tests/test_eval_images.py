"""The image protocols (swav_jax/eval/images.py, run.probe_classifier, run.finetune_classifier):
augmented batches with the configured crop statistics, a probe that solves a separable
image set, best-versus-final reporting, sharded equals unsharded, exact resume, and what
each protocol trains."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tiny_config
from train_helpers import assert_within_reordering_noise
from swav_jax.data.eval_batches import eval_batches
from swav_jax.data.sources import ArraySource
from swav_jax.eval import images, run
from swav_jax.eval.linear import probe_optimizer

SIZE = 16


def _config(**eval_overrides):
    config = tiny_config.get_config()
    config.data.num_workers = 0
    config.data.prefetch = 0
    for key, value in eval_overrides.items():
        config.eval[key] = value
    return config


def _coloured_set(n, seed):
    """n images of 20 x 24 px in 4 classes, each a colour (red, green, blue, olive) plus a
    little pixel noise: every crop keeps its class's colour, so the set is linearly
    separable in the features of even a random trunk."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    colours = np.array([[140, 0, 0], [0, 140, 0], [0, 0, 140], [70, 70, 0]])
    images = rng.integers(60, 70, (n, 20, 24, 3)) + colours[labels][:, None, None, :]
    return images.astype(np.uint8), labels


def _run_probe(config, variables, directory, train_set, test_set, *, max_epochs=None, mesh=None):
    mesh = mesh or images.eval_mesh()
    source = ArraySource(*train_set)
    classifier = run.probe_classifier(config, variables, 4, "random init")
    data = images.augmented_batches(
        config, source, mesh, batch_size=classifier.batch_size, size=SIZE, crop_scale=tuple(config.eval.crop_scale)
    )
    test = ArraySource(*test_set)
    return images.train_classifier(
        classifier, data, lambda: eval_batches(test, size=SIZE, batch_size=24),
        mesh=mesh, num_classes=4, directory=directory, log_every_steps=1000, max_epochs=max_epochs,
    )


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_probe_separates_coloured_images_and_reports_best_and_final(tmp_path):
    config = _config(linear_epochs=6, linear_batch_size=32, linear_lr=0.1)
    variables = run.random_init_variables(config)
    before = jax.device_get(variables)
    state, result = _run_probe(config, variables, str(tmp_path), _coloured_set(128, 0), _coloured_set(48, 1))
    # The trunk is frozen: only the head is trained, the trunk is left as given.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), before)
    assert result["top1_final"] == 100.0 and result["top5_final"] == 100.0
    assert result["epochs_done"] == 6
    # Best and final as the per-epoch validation recorded them.
    epochs = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in epochs] == list(range(1, 7))
    val = [e["linear/val_top1"] for e in epochs]
    assert result["top1_final"] == val[-1]
    assert result["top1_best"] == max(val) and result["best_epoch"] == val.index(max(val)) + 1
    assert result["top5_best"] == epochs[result["best_epoch"] - 1]["linear/val_top5"]
    assert epochs[0]["linear/lr"] == pytest.approx(0.1) and epochs[-1]["linear/lr"] < 0.01
    assert set(jax.device_get(state.params)) == {"kernel", "bias"} and state.batch_stats == {}


def test_record_validation_keeps_the_first_best_epoch():
    mesh = images.eval_mesh()
    classifier = images.Classifier(
        name="x", forward=None, frozen=(), init=lambda: ({"w": np.zeros(2, np.float32)}, {}),
        learning_rates=lambda e: 0.1, epochs=4, batch_size=8, momentum=0.9, weight_decay=0.0, settings={},
    )
    state = images.initial_state(classifier, mesh, probe_optimizer())
    tie = 100 * 320 / 360  # 88.88...: not a float32, ties must survive the float32 state
    for epoch, (top1, top5) in enumerate([(50.0, 90.0), (tie, 95.0), (tie, 99.0), (70.0, 97.0)], start=1):
        state = images._record_validation(state, {"top1": top1, "top5": top5}, epoch, mesh)
    best, last = jax.device_get(state.best), jax.device_get(state.last)
    assert (float(best["top1"]), float(best["top5"]), int(best["epoch"])) == (np.float32(tie), 95.0, 2)
    assert (float(last["top1"]), float(last["top5"])) == (70.0, 97.0)
    named = images.result_metrics("linear", {"top1_final": 70.0, "top5_final": 97.0, "top1_best": 80.0,
                                             "top5_best": 95.0, "best_epoch": 2, "epochs_done": 4})
    assert named == {"eval/linear_top1_final": 70.0, "eval/linear_top5_final": 97.0,
                     "eval/linear_top1_best": 80.0, "eval/linear_top5_best": 95.0}


def _coordinate_images(n, height=48, width=64):
    """Images whose red channel is 4x + 2 at column x and green 4y + 2 at row y."""
    x = np.broadcast_to(4 * np.arange(width)[None, :] + 2, (height, width))
    y = np.broadcast_to(4 * np.arange(height)[:, None] + 2, (height, width))
    image = np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8)
    return np.broadcast_to(image, (n, height, width, 3)).copy()


def test_augmented_batches_have_the_configured_crop_statistics():
    """Each crop's box, read back from its pixel coordinates: area fraction within the
    configured scale and spread over it, aspect ratio in [3/4, 4/3], half of them flipped."""
    config = _config()
    config.data.canvas_size = 64
    n, size, scale = 512, 32, (0.25, 0.75)
    data = images.augmented_batches(
        config, ArraySource(_coordinate_images(n), np.zeros(n, np.int64)), images.eval_mesh(),
        batch_size=n, size=size, crop_scale=scale,
    )
    batch = next(data)
    data.close()
    crops = np.asarray(jax.device_get(batch["crops"][0]), np.float64)
    assert crops.shape == (1, n, size, size, 3)
    red, green = crops[0, ..., 0], crops[0, ..., 1]
    # Output pixel j of a box of width w samples column left + (j + 0.5) w / size - 0.5.
    slope_x = (red[:, size // 2, -4] - red[:, size // 2, 3]) / (size - 7)
    slope_y = (green[:, -4, size // 2] - green[:, 3, size // 2]) / (size - 7)
    width, height = np.abs(slope_x) * size / 4, slope_y * size / 4
    area = width * height / (64 * 48)
    ratio = width / height
    assert np.all(area > scale[0] - 0.03) and np.all(area < scale[1] + 0.03)
    assert area.min() < scale[0] + 0.05 and area.max() > scale[1] - 0.05
    assert np.all(ratio > 0.75 - 0.03) and np.all(ratio < 4 / 3 + 0.03)
    flipped = slope_x < 0
    assert 0.4 < flipped.mean() < 0.6  # 512 fair coins: 5 sigma
    assert np.all(slope_y > 0)


def _probe_and_finetune(config, variables):
    return {
        "probe": run.probe_classifier(config, variables, 4, "x"),
        "finetune": run.finetune_classifier(config, variables, 4, "x", "finetune_test"),
    }


def _stepper(classifier, mesh):
    """runs(crops, labels, lrs) -> host (params, batch_stats, sums) after one train step
    from the initial state; one compiled step for all its calls."""
    tx = probe_optimizer(classifier.momentum, classifier.weight_decay)
    train_step, _ = images.make_steps(classifier, mesh, tx)
    frozen = images._replicated(classifier.frozen, mesh)

    def run(crops, labels, lrs):
        state = images.initial_state(classifier, mesh, tx)
        crops = jax.device_put(crops, NamedSharding(mesh, P(None, "data")))
        labels = jax.device_put(labels, NamedSharding(mesh, P("data")))
        state, sums = train_step(frozen, state, (crops,), labels, images._replicated(lrs, mesh))
        return jax.device_get(jax.block_until_ready((state.params, state.batch_stats, sums)))

    return run


@pytest.mark.parametrize("which", ["probe", pytest.param("finetune", marks=pytest.mark.slow)])
def test_sharded_step_equals_unsharded(which):
    """One step over 8 devices (BatchNorm of the fine-tuned trunk over the global batch)
    equals one step on one device, to the float32 noise of reordering the batch."""
    config = _config()
    classifier = _probe_and_finetune(config, run.random_init_variables(config))[which]
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (1, 16, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 16).astype(np.int32)
    lrs = classifier.learning_rates(0)
    sharded = _stepper(classifier, images.eval_mesh())(crops, labels, lrs)
    one_device = _stepper(classifier, jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]))
    single = one_device(crops, labels, lrs)
    reorderings = []
    for seed in (1, 2):
        order = np.random.default_rng(seed).permutation(16)
        reorderings.append(one_device(crops[:, order], labels[order], lrs))
    assert_within_reordering_noise(sharded, single, reorderings)
    if which == "finetune":  # fine-tuning trains every trunk parameter and its BN statistics
        params, batch_stats = jax.device_get(classifier.init())
        moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), sharded[0]["backbone"], params["backbone"])
        assert all(m > 0 for m in jax.tree.leaves(moved))
        moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), sharded[1], batch_stats)
        assert all(m > 0 for m in jax.tree.leaves(moved))


@pytest.mark.slow
def test_probe_resume_is_exact(tmp_path):
    config = _config(linear_epochs=3, linear_batch_size=16)
    variables = run.random_init_variables(config)
    train_set, test_set = _coloured_set(48, 2), _coloured_set(24, 3)
    straight, straight_result = _run_probe(config, variables, str(tmp_path / "a"), train_set, test_set)
    _, partial = _run_probe(config, variables, str(tmp_path / "b"), train_set, test_set, max_epochs=2)
    assert partial["epochs_done"] == 2
    resumed, resumed_result = _run_probe(config, variables, str(tmp_path / "b"), train_set, test_set)
    assert resumed_result == straight_result and resumed_result["epochs_done"] == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))
    # The per-epoch record of the resumed run is the straight run's.
    assert _read_jsonl(tmp_path / "b" / "metrics.jsonl") == _read_jsonl(tmp_path / "a" / "metrics.jsonl")
    # Other settings are refused, naming the key.
    config.eval.linear_lr = 0.1
    with pytest.raises(ValueError, match="lr=0.3"):
        _run_probe(config, variables, str(tmp_path / "b"), train_set, test_set)


@pytest.mark.slow
def test_cli_runs_both_protocols_on_the_digits(tmp_path, capsys, monkeypatch):
    """`swav-jax eval linear` (both protocols) and `eval finetune` from the command line, on
    a saved random-init network: results printed and appended to metrics.jsonl, labelled."""
    from swav_jax import cli, convert
    from swav_jax.models import build_model

    def swav_jax(*argv):
        # ml_collections reads --config.key=value overrides from sys.argv, as on a real command line.
        monkeypatch.setattr(sys, "argv", ["swav-jax", *argv])
        cli.main(list(argv))

    config = tiny_config.get_config()
    checkpoint = str(tmp_path / "random_init")
    convert.save_pretrained(checkpoint, build_model(config.model), run.random_init_variables(config))
    workdir = str(tmp_path / "work")
    common = ["--config", os.path.join(os.path.dirname(__file__), "tiny_config.py"), "--workdir", workdir,
              "--checkpoint", checkpoint, "--config.log_every_steps=100"]
    swav_jax("eval", "linear", *common, "--config.eval.linear_epochs=2", "--config.eval.linear_batch_size=256")
    swav_jax("eval", "linear", "--protocol", "features", *common, "--config.eval.linear_epochs=2")
    swav_jax("eval", "finetune", *common, "--labels-fraction", "0.1", "--config.eval.finetune.epochs=2",
             "--config.eval.finetune.batch_size=48")
    out = capsys.readouterr().out
    records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    keys = set().union(*records)
    for name in ("linear", "linear_features", "finetune_10pct"):
        for which in ("top1_final", "top5_final", "top1_best", "top5_best"):
            assert f"eval/{name}_{which}" in keys
            assert f"eval/{name}_{which} = " in out
    assert all(r["step"] == 0 for r in records)  # a converted checkpoint has no step
    assert "epochs_done = 2" in out and "subset_size = 144" in out
    with open(os.path.join(workdir, "finetune_10pct", "subset.txt")) as f:
        assert len(f.read().split()) == 144
    assert len(_read_jsonl(os.path.join(workdir, "linear_probe", "metrics.jsonl"))) == 2
    # A subset larger than the batch is refused before anything runs.
    with pytest.raises(SystemExit):
        swav_jax("eval", "finetune", *common, "--labels-fraction", "0.01", "--config.eval.finetune.batch_size=64")
    assert "exceeds the 14 images" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "knn", "--protocol", "features"], "--protocol does not apply to `swav-jax eval knn`"),
        (["eval", "linear", "--labels-fraction", "0.1"], "--labels-fraction does not apply"),
        (["eval", "linear", "--protocol", "features", "--max-epochs", "2"], "not to --protocol features"),
        (["eval", "finetune", "--max-epochs", "0"], "--max-epochs must be at least 1, got 0"),
    ],
)
def test_eval_options_of_another_evaluation_are_refused(argv, message, capsys):
    from swav_jax import cli

    with pytest.raises(SystemExit):
        cli.main([*argv, "--config", "demo", "--workdir", "/nonexistent"])
    assert message in capsys.readouterr().err
