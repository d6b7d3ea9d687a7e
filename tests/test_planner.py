"""`swav-jax plan` (swav_jax.plan.planner): a config's train step, crop resize and feature
step compiled for a TPU slice through the code path training uses, with the per-chip
figures checked against independent counts (XLA's memory analysis against the compiled
input layouts, the Sinkhorn's cross-chip traffic against its algorithm), the command
end to end, and a config that cannot fit."""

import contextlib
import importlib.util
import io
import json
import math
import os

import jax
import pytest

import tiny_config
from swav_jax import cli
from swav_jax.plan import planner, topology
from swav_jax.plan.analysis import CONVOLUTION, MATMUL, summarize_collectives
from swav_jax.plan.chips import GIB
from swav_jax.plan.planner import format_plan, make_plan, num_train_examples

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu not installed (pip install "swav-jax[tpu]"): no TPU topology to compile for',
)
TINY = os.path.join(os.path.dirname(__file__), "tiny_config.py")
SLICE = "v5p:2x2x1"  # 4 chips


def _excb_config():
    c = tiny_config.get_config()
    c.method = "excb"
    c.excb.num_clusters = 12
    c.excb.hidden_dim = 32
    c.excb.proj_dim = 16
    return c


def _logical_crop_bytes(config, chips):
    return sum(n * config.batch_size // chips * s * s * 3 for n, s in zip(config.crops.num_crops, config.crops.size_crops))


def _check_memory_and_estimates(plan, config):
    """Per chip: XLA's argument bytes are the state and the batch as the compiled input
    layouts tile them; the donated state is updated in place; phases, fit and run follow."""
    train = plan.train.stats
    assert plan.compiled and plan.fits and plan.problems == []
    assert train.argument_bytes == plan.state_bytes + plan.batch_bytes
    assert train.alias_bytes == plan.state_bytes  # every state buffer reused by the new state
    assert plan.batch_bytes >= _logical_crop_bytes(config, plan.chips)  # uint8 crops, tiles padded
    assert plan.prefetch_bytes == config.data.prefetch * plan.batch_bytes
    phases = plan.phase_hbm_bytes
    assert phases["train step"] == train.hbm_bytes + plan.prefetch_bytes
    assert phases["crop resize"] == plan.crops.stats.hbm_bytes + plan.state_bytes + plan.prefetch_bytes
    assert plan.hbm_bytes == max(phases.values()) <= plan.chip.program_hbm_bytes
    # The crop resize's FLOPs include at least its two weight products per crop.
    canvas, local = config.data.canvas_size, config.batch_size // plan.chips
    products = sum(n * local * 2 * s * canvas * 3 * (canvas + s)
                   for n, s in zip(config.crops.num_crops, config.crops.size_crops))
    assert plan.crops.stats.flops >= products
    assert plan.step_s == pytest.approx(plan.train.estimate.step_s + plan.crops.estimate.step_s)
    assert plan.run.hours == pytest.approx(plan.total_steps * plan.step_s / 3600)
    assert train.collectives == summarize_collectives(list(plan.collective_ops))
    assert {op.kind for op in plan.collective_ops} == {"all-reduce"}  # the state is replicated
    convolutions, matmuls = plan.flops_by_source[CONVOLUTION], plan.flops_by_source[MATMUL]
    assert 0.5 * train.flops < convolutions and matmuls > 0 and convolutions + matmuls <= train.flops


def test_known_data_set_sizes_and_the_override():
    config = tiny_config.get_config()  # the digits
    assert num_train_examples(config) == 1437
    assert num_train_examples(config, 1000) == 1000
    config.data.source, config.data.name = "tfds", "imagenet2012"
    assert num_train_examples(config) == 1_281_167
    config.data.name = "places365"
    with pytest.raises(ValueError, match="pass --num-examples N"):
        num_train_examples(config)


def test_plan_without_libtpu_says_how_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(topology.importlib.util, "find_spec", lambda name: None if name == "libtpu" else find_spec(name))
    with pytest.raises(SystemExit, match=r'pip install "swav-jax\[tpu\]"'):
        cli.main(["plan", "--config", TINY, "--topology", SLICE])


@pytest.fixture(scope="module")
def tiny_swav_command(tmp_path_factory):
    """`swav-jax plan` on the tiny config for SLICE, run once: one compile serves the
    command's checks and the per-chip ones. Returns (the Plan it made, what it printed,
    its JSON)."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    make, plans = planner.make_plan, []

    def recording(*args, **kwargs):
        plans.append(make(*args, **kwargs))
        return plans[-1]

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        patch.setattr(planner, "make_plan", recording)
        cli.main(["plan", "--config", TINY, "--topology", SLICE, "--json", str(out)])  # fits: no SystemExit
    (plan,) = plans
    return plan, printed.getvalue(), json.loads(out.read_text())


@needs_libtpu
@pytest.mark.slow
def test_tiny_swav_step_per_chip_and_the_sinkhorn_traffic(tiny_swav_command):
    config = tiny_config.get_config()
    plan, _, _ = tiny_swav_command
    assert plan.chips == 4 and plan.mesh_shape == {"data": 1, "bn": 4}
    _check_memory_and_estimates(plan, config)
    # The Sinkhorn of each assigning crop moves 1 + num_iters K-vectors (a pmax, then one
    # psum per iteration) and the crops share one scalar (the global sample count).
    num_prototypes, iters = config.model.num_prototypes[0], config.swav.sinkhorn_iterations
    sinkhorn = [op for op in plan.collective_ops if "sinkhorn" in op.source]
    assert sinkhorn and {op.group_size for op in sinkhorn} == {4}
    operands = [dims for op in sinkhorn for _, dims in op.shapes]
    assert sorted(operands) == sorted([()] + [(num_prototypes,)] * len(config.swav.crops_for_assign) * (1 + iters))
    assert "convolutions" in format_plan(plan)


@needs_libtpu
@pytest.mark.slow
def test_tiny_excb_step_per_chip():
    config = _excb_config()
    plan = make_plan(config, SLICE)
    _check_memory_and_estimates(plan, config)
    # Cross-chip traffic: the student's gradients (float32) and small vectors (BN
    # statistics, the tracker's cluster counts, metrics); the teacher, its EMA and the
    # optimiser state stay local.
    student = sum(math.prod(p.shape) * 4 for p in jax.tree.leaves(plan.abstract_state.params))
    moved = sum(op.operand_bytes for op in plan.collective_ops)
    assert student <= moved < 1.5 * student


@needs_libtpu
@pytest.mark.slow
def test_plan_command_end_to_end(tiny_swav_command):
    plan, printed, report = tiny_swav_command
    assert "fits" in printed and "DOES NOT FIT" not in printed and "wrote " in printed
    assert printed.startswith(format_plan(plan))
    for key in ("topology", "chips", "chip_hbm_gib", "hbm_per_chip_gib", "fits", "xla_tflop_per_chip_step",
                "collectives", "step_time_s_est", "images_per_sec_est", "run_hours_est"):
        assert key in report, key
    config = tiny_config.get_config()
    assert report["topology"] == SLICE and report["chips"] == 4 and report["fits"] is True
    assert report["chip_hbm_gib"] == pytest.approx(95e9 / GIB)
    assert report["usable_hbm_gib"] == pytest.approx(95.74)  # what libtpu lets a v5p program use
    assert 0 < report["hbm_per_chip_gib"] < report["usable_hbm_gib"]
    assert report["xla_tflop_per_chip_step"] > 0
    assert [c["kind"] for c in report["collectives"]] == ["all-reduce"] and report["collectives"][0]["count"] > 0
    assert report["steps_per_epoch"] == 1437 // config.batch_size
    assert report["images_per_sec_est"] == pytest.approx(config.batch_size / report["step_time_s_est"])
    assert report["run_hours_est"] == pytest.approx(report["total_steps"] * report["step_time_s_est"] / 3600)
    assert report["chip_hours_est"] == pytest.approx(4 * report["run_hours_est"])
    assert sum(report["flop_fraction"].values()) == pytest.approx(1.0)


@needs_libtpu
@pytest.mark.slow
def test_a_config_that_cannot_fit_exits_2_with_the_reason(tmp_path, capsys):
    # 2^26 prototypes of 16 floats: 4 GiB of parameters, as much again for the LARS
    # momentum, the gradient and the scores: more than a v5e chip's 16 GB.
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--config", TINY, "--topology", "v5e:2x2", "--json", str(out),
                  "--config.model.num_prototypes=(67108864,)"])
    assert exit_info.value.code == 2
    printed = capsys.readouterr().out
    assert "PROBLEM: train step does not fit" in printed or "DOES NOT FIT" in printed
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["problems"]
    assert report["hbm_per_chip_gib"] is None or report["hbm_per_chip_gib"] > report["usable_hbm_gib"]


@needs_libtpu
def test_bad_input_is_one_line_before_anything_compiles(capsys):
    # A batch that does not divide over the 64 chips, a shape libtpu cannot build, a data
    # set of unknown size: exit 1 with `error: ...` naming the key or flag.
    for argv, named in [
        (["--topology", "v5p:4x4x4", "--config.batch_size=100"], "batch_size"),
        (["--topology", "v5p:3x3x3"], "v5p:3x3x3"),
        (["--topology", SLICE, "--config.data.source=tfds", "--config.data.name=places365"], "--num-examples"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["plan", "--config", TINY, *argv])
        assert exit_info.value.code == 1
        (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
        assert line.startswith("error: ") and named in line, line
