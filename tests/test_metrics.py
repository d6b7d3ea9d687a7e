"""Metrics out: TensorBoard events (scalars, the config as text, hyperparameters) by
default, W&B when configured and resumed with the run; start-up phases; throughput
without evaluations and an ETA with them."""

import glob
import io
import json
import struct
import sys
import types

import pytest
from tensorboardX.proto import event_pb2

import tiny_config
from swav_jax.train import metrics as metrics_module
from swav_jax.train import run_config
from swav_jax.train.metrics import MetricsWriter, Progress, phase


def _events(workdir):
    """Every Event of the TensorBoard files under workdir/tensorboard (TFRecord framing:
    uint64 length, uint32 crc, payload, uint32 crc)."""
    events = []
    for path in sorted(glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12:at + 12 + length])
            events.append(event)
            at += 12 + length + 4
    return events


def test_tensorboard_scalars_config_text_and_hparams(tmp_path):
    config = run_config.to_dict(tiny_config.get_config())
    writer = MetricsWriter(str(tmp_path))
    writer.write_config(config)
    writer.write(1, {"train/loss": 2.5, "train/lr": 0.1, "train/bad": float("nan")})
    writer.write(2, {"train/loss": 2.0})
    writer.close()
    scalars, texts, plugins = {}, {}, set()
    for event in _events(tmp_path):
        for value in event.summary.value:
            plugins.add(value.metadata.plugin_data.plugin_name)
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
            elif value.metadata.plugin_data.plugin_name == "text":
                texts[value.tag] = b"".join(value.tensor.string_val).decode()
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert scalars["train/lr"] == [(1, pytest.approx(0.1))]
    assert "train/bad" not in scalars  # non-finite values stay in metrics.jsonl only
    assert "batch_size=16" in texts["config/text_summary"] and "num_prototypes=12" in texts["config/text_summary"]
    assert "hparams" in plugins
    hparams = [v for e in _events(tmp_path) for v in e.summary.value if v.tag == "_hparams_/session_start_info"]
    assert hparams and b"model.num_prototypes" in hparams[0].metadata.plugin_data.content
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert lines[0]["step"] == 1 and lines[1] == {"step": 2, "train/loss": 2.0}


class _FakeWandb(types.ModuleType):
    """Records what the writer asks of wandb."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.configs, self.finished = [], [], [], 0
        self.util = types.SimpleNamespace(generate_id=lambda: f"id{len(self.inits)}")

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self
        return types.SimpleNamespace(
            define_metric=lambda *a, **k: None,
            log=lambda record: fake.logged.append(record),
            config=types.SimpleNamespace(update=lambda c, **k: fake.configs.append(c)),
            finish=lambda: setattr(fake, "finished", fake.finished + 1),
        )


def test_wandb_logs_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for step in (1, 2):  # the run, then its resumption (or a later `swav-jax eval`)
        writer = MetricsWriter(str(tmp_path), wandb_project="swav")
        writer.write_config({"batch_size": 16})
        writer.write(step, {"train/loss": 1.0 / step, "train/nan": float("nan")})
        writer.close()
    assert [i["id"] for i in fake.inits] == ["id0", "id0"]
    assert all(i["project"] == "swav" and i["resume"] == "allow" for i in fake.inits)
    assert fake.logged == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5}]
    assert fake.configs == [{"batch_size": 16}] * 2 and fake.finished == 2


def test_wandb_project_without_wandb_is_one_clear_error(tmp_path, monkeypatch):
    from swav_jax.errors import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"wandb_project is 'swav' but wandb is not installed: pip install"):
        MetricsWriter(str(tmp_path), wandb_project="swav")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_throughput_leaves_out_evaluations_and_the_eta_counts_them(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(metrics_module.time, "perf_counter", clock)
    progress = Progress(100, 10, 0, eval_steps=(50, 100, 100), stream=io.StringIO())
    clock.now = 10.0
    assert progress.eta(10, 1.0) == "01:30 + 3 evals"  # no evaluation timed yet
    assert progress.rate(10) == (1.0, 10.0)
    clock.now = 20.0  # 10 more steps ...
    with progress.evaluation():
        clock.now = 50.0  # ... and a 30 s evaluation
    clock.now = 60.0  # ... and 10 more steps
    steps_per_sec, images_per_sec = progress.rate(30)
    assert (steps_per_sec, images_per_sec) == (1.0, 10.0)  # 20 steps in 20 s of training
    assert progress.eta(30, 1.0) == "02:40"  # 70 s of steps + 3 evaluations x 30 s
    assert progress.eta(60, 1.0) == "01:40"  # 40 s + the 2 at the end
    assert progress.eta(100, 1.0) == "01:00"


def test_phase_says_what_and_how_long(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(metrics_module.time, "perf_counter", clock)
    out = io.StringIO()
    with phase("compiling the train step", stream=out):
        clock.now = 31.25
    assert out.getvalue() == "compiling the train step ... 31.2 s\n"
    with pytest.raises(KeyError), phase("restoring", stream=out):
        raise KeyError
    assert out.getvalue().endswith("restoring ... failed\n")
    silent = io.StringIO()
    with phase("x", enabled=False, stream=silent):
        pass
    assert silent.getvalue() == ""
