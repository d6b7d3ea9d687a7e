"""SwAV train-step benchmark (JAX): images/s, step time, MFU and peak memory.

    python bench/train_step.py [--crops 2x224+6x96 2x160+4x96 2x224] [--batch 32 64 128 256]
                               [--dtype bfloat16] [--steps 20] [--e2e] [--json out.json]

Times the trainer's own SwAV step (`swav_jax.methods.swav`, built as `train` builds it) (device augmentation, multi-crop
forward, Sinkhorn, loss, gradients, LARS update; the state is donated) on synthetic
uint8 crops already on the devices, for every crop setting x per-device batch. Each
point runs in its own process, so peak memory is that point's and an out-of-memory
point does not end the sweep.

Per point:
  step ms       median over --steps timed steps after --warmup steps, blocking on the
                new state and metrics after each step
  img/s         global batch / step time (and per device)
  TFLOP/s/dev   model FLOPs (analytic, bench/step_common.py: 3 x the forward's conv and
                matmul FLOPs; no augmentation, BN or Sinkhorn) per second per device
  MFU %         that / the device's peak 16-bit FLOP/s (--peak-tflops, or known devices)
  peak GB       device.memory_stats()['peak_bytes_in_use'] (GPU/TPU; absent on CPU)
  compiled GB   the compiled step's memory_analysis(): arguments + outputs + temporaries
                - aliased (donated) bytes; available on every backend
The JSON (--json) also holds XLA's own FLOP count of the compiled step
(cost_analysis(), per device) and the compile time.

--profile DIR, after the timed steps of each point: the compiled step's optimised HLO
(DIR/train_step_<crops>_b<batch>.hlo.txt) and a jax.profiler trace of --profile-steps
more synthetic steps (DIR/plugins/profile/<run>/*.xplane.pb; bench/profile_summary.py
turns it into per-op device times).

--steps 0 compiles only (FLOPs and compiled memory, no timing): a memory estimate of a
big configuration on a machine too slow to run it.

--e2e adds two rows per point, fed by the real input pipeline (grain over an image
folder of generated ~500 x 375 JPEGs, `swav_jax.data.pipeline.make_train_iterator`,
crops cut and resized on device): 'host' pulls batches only (the pipeline's rate),
'e2e' runs the step on them without blocking, as the trainer's loop does. The host
keeps up when e2e img/s is close to the synthetic img/s.

CPU smoke run (tiny everything, 8 host devices):
    python bench/train_step.py --arch resnet18 --base-width 8 --small-stem --hidden-dim 32 \\
        --prototypes 30 --crops 2x32+4x16 --batch 8 --steps 5 --devices 8 --e2e --canvas 64 --workers 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # swav_jax, bench

from bench import step_common  # noqa: E402

_RESULT = "TRAIN_STEP_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", nargs="+", default=["2x224+6x96", "2x160+4x96", "2x224"],
                   help="crop settings, count x pixels per resolution group")
    p.add_argument("--batch", nargs="+", type=int, default=[32, 64, 128, 256], help="per-device batch sizes")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--base-width", type=int, default=64)
    p.add_argument("--small-stem", action="store_true")
    p.add_argument("--hidden-dim", type=int, default=2048)
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--prototypes", type=int, default=3000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=20, help="timed steps (0: compile only)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--devices", type=int, default=0,
                   help="devices of the data mesh (0: all); >1 on CPU makes that many host devices")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s per device, in TFLOP/s")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="write the step's HLO and a jax.profiler trace of --profile-steps steps here")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--e2e", action="store_true", help="also feed the step from the real input pipeline")
    p.add_argument("--images", type=int, default=256, help="--e2e: JPEGs to generate")
    p.add_argument("--workers", type=int, default=8, help="--e2e: grain worker processes")
    p.add_argument("--read-threads", type=int, default=2, help="--e2e: threads per worker")
    p.add_argument("--canvas", type=int, default=512, help="--e2e: decode canvas size")
    p.add_argument("--worker", nargs=2, metavar=("CROPS", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for spec in args.crops:
        step_common.parse_crops(spec)
    if min(args.batch) < 1 or args.steps < 0 or args.warmup < 1 or args.devices < 0 or args.profile_steps < 1:
        p.error("--batch >= 1, --steps >= 0, --warmup >= 1, --devices >= 0 and --profile-steps >= 1 are required")
    return args


def flops_per_image(args, num_crops, size_crops) -> int:
    return step_common.train_flops_per_image(
        args.arch, num_crops, size_crops, width=args.width, base_width=args.base_width,
        small_stem=args.small_stem, hidden_dim=args.hidden_dim, proj_dim=args.proj_dim,
        num_prototypes=(args.prototypes,),
    )


def make_config(args, num_crops, size_crops, global_batch):
    from swav_jax.configs import base

    c = base.get_config()
    c.batch_size = global_batch
    c.crops.num_crops = num_crops
    c.crops.size_crops = size_crops
    # The release's scales: global crops (0.14, 1), the others (0.05, 0.14).
    c.crops.min_scale_crops = (0.14,) + (0.05,) * (len(num_crops) - 1)
    c.crops.max_scale_crops = (1.0,) + (0.14,) * (len(num_crops) - 1)
    c.model.arch = args.arch
    c.model.width = args.width
    c.model.base_width = args.base_width
    c.model.small_stem = args.small_stem
    c.model.hidden_dim = args.hidden_dim
    c.model.proj_dim = args.proj_dim
    c.model.num_prototypes = (args.prototypes,)
    c.model.dtype = args.dtype
    c.model.sync_bn_group_size = 0  # BN over all devices of the mesh
    c.swav.queue_length = 0
    # Timed steps stand for the bulk of a run, after the prototypes' freeze (the frozen
    # steps compute the same; the freeze is a select).
    c.swav.freeze_prototypes_niters = 0
    c.data.num_workers = args.workers
    c.data.read_threads = args.read_threads
    c.data.canvas_size = args.canvas
    return c


def _timed_steps(run, state, feed, count: int):
    """Runs `count` steps, blocking after each; returns (state, metrics, per-step seconds)."""
    import jax

    times, metrics = [], None
    for _ in range(count):
        t = time.perf_counter()
        state, metrics = run(state, feed())
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    return state, metrics, times


def run_point(args, spec: str, batch: int) -> tuple[dict, list[dict]]:
    """Compiles and times one (crop setting, per-device batch) point in this process."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from swav_jax.mesh import data_axes, make_mesh
    from swav_jax.methods import get_method
    from swav_jax.train.validate import validate_config

    num_crops, size_crops = step_common.parse_crops(spec)
    n_dev = args.devices or jax.device_count()
    if n_dev > jax.device_count():
        raise ValueError(f"--devices {n_dev}: only {jax.device_count()} devices are visible")
    devices = jax.devices()[:n_dev]
    config = make_config(args, num_crops, size_crops, batch * n_dev)
    validate_config(config, num_devices=n_dev, num_processes=1)

    mesh = make_mesh(config, devices)
    steps_per_epoch = 1000
    # The trainer's own program (swav_jax.train.loop.train builds the same).
    program = get_method(config.method).build(
        config, mesh, steps_per_epoch=steps_per_epoch, total_steps=int(config.epochs) * steps_per_epoch,
        num_examples=steps_per_epoch * int(config.batch_size),
    )
    state, train_step = program.init_state(), program.train_step

    rng = np.random.default_rng(0)
    sharding = NamedSharding(mesh, P(None, data_axes(mesh)))
    crops = tuple(
        jax.device_put(rng.integers(0, 256, (n, batch * n_dev, s, s, 3), dtype=np.uint8), sharding)
        for n, s in zip(num_crops, size_crops)
    )
    synthetic = {"crops": crops}

    t = time.perf_counter()
    compiled = train_step.lower(state, synthetic).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()

    device = devices[0]
    info = {"device": f"{n_dev} x {device.platform}: {device.device_kind}", "jax": jax.__version__}
    fpi = flops_per_image(args, num_crops, size_crops)
    peak = step_common.peak_flops(device.device_kind, args.peak_tflops)
    if args.dtype == "float32" and not args.peak_tflops:
        peak = None  # the table is for 16-bit compute
    common = {
        "crops": spec,
        "per_device_batch": batch,
        "num_devices": n_dev,
        "dtype": args.dtype,
        "model_gflop_per_image": fpi / 1e9,
        "xla_gflop_per_image": (cost or {}).get("flops", float("nan")) / batch / 1e9,
        "compile_s": compile_s,
        "compiled_gb": None if mem is None else (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes) / 1e9,
        "compiled_temp_gb": None if mem is None else mem.temp_size_in_bytes / 1e9,
    }
    if args.steps == 0:
        return info, [{**common, "mode": "compile-only"}]

    state, _, _ = _timed_steps(compiled, state, lambda: synthetic, args.warmup)
    state, metrics, times = _timed_steps(compiled, state, lambda: synthetic, args.steps)
    loss = float(metrics["train/loss"])
    stats = jax.devices()[0].memory_stats() or {}
    row = {**common, "mode": "synthetic", **step_common.step_stats(times), "loss": loss}
    row.update(step_common.throughput(row, per_device_batch=batch, num_devices=n_dev, flops_per_image=fpi,
                                      peak=peak))
    if "peak_bytes_in_use" in stats:
        row["peak_gb"] = stats["peak_bytes_in_use"] / 1e9
    rows = [row]
    if args.profile:
        state = write_profile(args.profile, compiled, state, synthetic, args.profile_steps,
                              f"{spec.replace('+', '_')}_b{batch}")
    if args.e2e:
        rows += run_e2e(args, config, mesh, data_axes(mesh), compiled, state, common, fpi, peak)
    return info, rows


def write_profile(folder: str, compiled, state, batch: dict, steps: int, name: str):
    """Writes the compiled step's HLO text and a profiler trace of `steps` steps into `folder`.

    Each traced step is a StepTraceAnnotation, so trace viewers split the timeline by
    step. Returns the new state (the step donates it).
    """
    import jax

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"train_step_{name}.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    with jax.profiler.trace(folder):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))
    return state


def run_e2e(args, config, mesh, data_axis, compiled, state, common, fpi, peak) -> list[dict]:
    """'host' (input pipeline alone) and 'e2e' (pipeline feeding the step) rows."""
    import jax

    from bench.pipeline import ImageNetSized, make_jpegs
    from swav_jax.data import pipeline
    from swav_jax.data.sources import FolderSource

    n_dev, batch = common["num_devices"], common["per_device_batch"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        make_jpegs(folder, args.images)
        with config.unlocked():
            config.data.source, config.data.data_dir = "folder", folder
        # ImageNet's length over the few files: grain's index shuffle is slow for tiny sets.
        source = ImageNetSized(FolderSource(folder))
        it = pipeline.make_train_iterator(config, mesh=mesh, data_axis=data_axis, source=source)
        try:
            feed = lambda: {"crops": next(it)["crops"]}  # noqa: E731
            # Worker start-up, the crop function's compilation, full prefetch queue.
            state, _, _ = _timed_steps(compiled, state, feed, args.warmup)
            t = time.perf_counter()
            for _ in range(args.steps):
                jax.block_until_ready(next(it)["crops"])
            host_s = (time.perf_counter() - t) / args.steps
            t = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = compiled(state, feed())
            jax.block_until_ready((state, metrics))
            e2e_s = (time.perf_counter() - t) / args.steps
        finally:
            it.close()
    for mode, seconds, note in (
        ("host", host_s, f"pipeline only, {args.workers} workers x {args.read_threads} threads"),
        ("e2e", e2e_s, "pipeline + step, not blocking per step (mean)"),
    ):
        row = {**common, "mode": mode, "step_ms": 1e3 * seconds, "note": note}
        row.update(step_common.throughput(row, per_device_batch=batch, num_devices=n_dev, flops_per_image=fpi,
                                          peak=peak))
        if mode == "host":
            row.update(model_tflops_per_device=None, mfu=None)
        rows.append(row)
    return rows


def main() -> None:
    args = parse_args()
    if args.devices > 1:
        # Host devices for CPU runs; accelerator backends ignore this flag.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
        ).strip()
    if args.worker:
        info, rows = run_point(args, args.worker[0], int(args.worker[1]))
        print(_RESULT + json.dumps({"info": info, "rows": rows}), flush=True)
        return

    info = step_common.run_info("swav-jax train step")
    info["flops_note"] = (
        "model FLOPs (analytic, 3 x forward) per image: "
        + ", ".join(
            f"{spec}: {flops_per_image(args, *step_common.parse_crops(spec)) / 1e9:.2f} GFLOP" for spec in args.crops
        )
    )
    rows = []
    for spec in args.crops:
        for batch in args.batch:
            print(f"[{spec} batch {batch}/device] ...", file=sys.stderr, flush=True)
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", spec, str(batch)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False,
            )
            sys.stderr.write(proc.stderr)
            results = [ln[len(_RESULT):] for ln in proc.stdout.splitlines() if ln.startswith(_RESULT)]
            if proc.returncode or not results:
                errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "RESOURCE_EXHAUSTED" in ln]
                reason = (errors[-1] if errors else f"exit status {proc.returncode}")[:120]
                rows.append({"mode": "synthetic", "crops": spec, "per_device_batch": batch,
                             "note": f"failed: {reason}"})
                continue
            out = json.loads(results[-1])
            info.update(out["info"])
            rows.extend(out["rows"])
            for row in out["rows"]:
                print(f"  {row['mode']}: {row.get('step_ms', float('nan')):.1f} ms/step, "
                      f"{row.get('img_per_s', float('nan')):.1f} img/s", file=sys.stderr, flush=True)
    step_common.print_table(info, rows)
    if args.json:
        step_common.write_json(args.json, info, rows)


if __name__ == "__main__":
    main()
