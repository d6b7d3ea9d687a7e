"""`swav-jax` command line: argument parsing and dispatch only.

    swav-jax configs                                   list the recipes
    swav-jax train --config demo --workdir DIR [--config.key=value ...]
    swav-jax eval knn|linear|finetune --config CONFIG --workdir DIR [--checkpoint PATH]
        [--protocol images|features] [--labels-fraction F] [--subset-file FILE] [--max-epochs N]
    swav-jax plan --config CONFIG --topology v5p:4x4x4 [--json FILE] [--num-examples N]
    swav-jax show-crops IMAGE... --config CONFIG --out crops.png
    swav-jax convert --from-torch CHECKPOINT.pth.tar --arch resnet50 --out DIR
    swav-jax plot --workdir DIR

`--config` takes a recipe name (`swav-jax configs` lists them) or a Python file with
`get_config()`; any key can be overridden with `--config.key=value` (ml_collections
config flags).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import signal
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags


CONFIG_HELP = (
    "a recipe name (e.g. --config demo; `swav-jax configs` lists them) or a Python file with "
    "get_config() (e.g. --config my_recipe.py); override keys with --config.KEY=VALUE "
    "(e.g. --config.batch_size=256)"
)


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates the `--config.key=value` overrides from the other arguments."""
    overrides, rest = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--config."):
            overrides.append(arg if "=" in arg else f"{arg}={next(it, '')}")
        else:
            rest.append(arg)
    return overrides, rest


def load_config(config_args: list[str]):
    """Loads `--config=NAME|FILE` with its `--config.key=value` overrides."""
    from swav_jax import configs

    given = [a.split("=", 1)[1] for a in config_args if a.startswith("--config=")]
    if not given:
        raise SystemExit(f"error: --config is required: {CONFIG_HELP}")
    try:
        path = configs.resolve(given[-1])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    # A key given twice takes its last value, as any other flag. absl parses each tuple
    # override onto the previous one, so a repeated tuple key would otherwise concatenate
    # (num_prototypes (64,) then (128,) would silently become two prototype heads).
    last = {a.split("=", 1)[0]: a for a in config_args if not a.startswith("--config=")}
    _check_keys(_parse_config(path, []), [key[len("--config."):] for key in last])
    return _parse_config(path, list(last.values()))


def _parse_config(path: str, overrides: list[str]):
    argv = ["swav-jax", f"--config={path}"] + overrides
    values = flags.FlagValues()
    # sys_argv: the overrides are read from these arguments, not from the process's sys.argv.
    config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
        raise SystemExit(f"error: bad config or override: {e}") from None
    return values.config


def _check_keys(config, keys: list[str]) -> None:
    """Exits naming the first key `config` does not have, with the nearest ones it has."""
    known = []

    def walk(node, prefix):
        for name in node.keys():
            known.append(prefix + name)
            if isinstance(node[name], ml_collections.ConfigDict):
                walk(node[name], prefix + name + ".")

    walk(config, "")
    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(k) for k in near)}?" if near else ""
            raise SystemExit(f"error: unknown config key {key!r}{hint}")


def _start_jax(config, distributed: str) -> None:
    """Process-wide jax setup, before any other jax call: the config's CPU device count,
    then (--distributed auto) `jax.distributed.initialize()` with the arguments
    swav_jax.cluster reads from the launcher's environment (local multi-process, SLURM;
    Cloud TPU pods are detected by jax itself)."""
    import jax

    from swav_jax.checks import non_negative_int

    if non_negative_int(config.cpu_devices, "cpu_devices"):
        jax.config.update("jax_num_cpu_devices", config.cpu_devices)
    if distributed == "off":
        return
    from swav_jax.cluster import initialize_kwargs

    jax.distributed.initialize(**initialize_kwargs(os.environ))


class _Preemption:
    """SIGTERM (a preemption notice) sets a flag the trainer polls: it saves a checkpoint
    and returns instead of dying mid-step."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        # None: the previous handler was not Python's (jax.distributed installs one in C++).
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True


def _configs(args, config_args):
    del args, config_args
    from swav_jax import configs

    rows = [configs.describe(name) for name in configs.names()]
    columns = ("name", "method", "network", "crops", "batch", "epochs")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    for row in [dict(zip(columns, columns), about="reproduces"), *rows]:
        print("  ".join(row[c].ljust(widths[c]) for c in columns) + "  " + row["about"])
    print("\nswav-jax train --config NAME --workdir DIR [--config.KEY=VALUE ...]; "
          "your own file: start from `from swav_jax.configs import base`.")


def _train(args, config_args):
    config = load_config(config_args)
    _start_jax(config, args.distributed)
    from swav_jax.train.loop import train

    with _Preemption() as preemption:
        train(config, args.workdir, max_steps=args.max_steps, stop_requested=lambda: preemption.requested)


def _plan(args, config_args):
    import json

    from swav_jax.plan.planner import format_plan, make_plan
    from swav_jax.plan.topology import TpuCompilerMissing

    config = load_config(config_args)
    try:
        plan = make_plan(config, args.topology, num_examples=args.num_examples,
                         progress=lambda line: print(line + " ...", file=sys.stderr, flush=True))
    except TpuCompilerMissing as e:
        raise SystemExit(f"error: {e}") from None
    print(format_plan(plan))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_json(), f, indent=1)
        print(f"wrote {args.json}")
    if not plan.fits:
        raise SystemExit(2)


def _show_crops(args, config_args):
    from swav_jax.data.show_crops import show_crops

    show_crops(args.images, load_config(config_args), args.out, seed=args.seed)
    print(f"wrote {args.out}")


def _check_eval_options(args) -> None:
    """Options of one evaluation given to another are refused, not ignored."""
    applies = {
        "--protocol": (args.protocol, ("linear",)),
        "--labels-fraction": (args.labels_fraction, ("finetune",)),
        "--subset-file": (args.subset_file, ("finetune",)),
        "--max-epochs": (args.max_epochs, ("linear", "finetune")),
    }
    for flag, (value, evaluations) in applies.items():
        if value is not None and args.evaluation not in evaluations:
            raise ValueError(f"{flag} does not apply to `swav-jax eval {args.evaluation}`")
    if args.protocol == "features" and args.max_epochs is not None:
        raise ValueError("--max-epochs applies to the image protocols, not to --protocol features")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ValueError(f"--max-epochs must be at least 1, got {args.max_epochs}")


def _eval(args, config_args):
    _check_eval_options(args)
    config = load_config(config_args)
    _start_jax(config, args.distributed)
    import jax

    from swav_jax.eval import run
    from swav_jax.train.metrics import MetricsWriter
    from swav_jax.train.validate import validate_eval_config

    if args.labels_fraction is not None:
        config.eval.finetune.labels_fraction = args.labels_fraction
    if args.subset_file is not None:
        config.eval.finetune.subset_file = args.subset_file
    validate_eval_config(
        config, args.evaluation, num_devices=jax.device_count(), num_processes=jax.process_count()
    )
    source = args.checkpoint or args.workdir
    variables, step = run.load_variables(source)
    evaluated = f"{os.path.abspath(source)} (step {step})"
    if args.evaluation == "knn":
        results = {**run.knn_eval(config, variables), **run.knn_reference_levels(config)}
    elif args.protocol == "features":
        results = run.linear_features_eval(config, variables)
    else:
        protocol = run.linear_eval if args.evaluation == "linear" else run.finetune_eval
        results = protocol(config, variables, args.workdir, evaluated=evaluated, max_epochs=args.max_epochs)
    metrics = {k: v for k, v in results.items() if k.startswith("eval/")}
    if jax.process_index() == 0:
        for key, value in results.items():
            print(f"{key} = {value:.2f}" if key in metrics else f"{key} = {value}")
    writer = MetricsWriter(args.workdir, jax.process_index() == 0, wandb_project=config.logging.wandb_project)
    writer.write(max(step, 0), metrics)
    writer.close()


def _convert(args, config_args):
    del config_args
    from swav_jax.convert import main_convert

    main_convert(args)


def _plot(args, config_args):
    del config_args
    import ml_collections

    from swav_jax.eval.plots import RunInfo, plot_metrics, run_info
    from swav_jax.train import run_config

    saved = run_config.read(args.workdir)  # K, method, batch for the titles and ln K lines
    info = run_info(ml_collections.ConfigDict(saved)) if saved else RunInfo()
    out_dir = args.out or os.path.join(args.workdir, "plots")
    for path in plot_metrics(os.path.join(args.workdir, "metrics.jsonl"), out_dir, info):
        print(f"wrote {path}")


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    # The `--config.KEY=VALUE` overrides are taken out of argv before argparse (main).
    parser.add_argument("--config", metavar="NAME|FILE", required=True, help=CONFIG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swav-jax",
        description="SwAV self-supervised pretraining in JAX.",
        epilog="example: swav-jax configs; swav-jax train --config demo --workdir /tmp/swav-demo; "
        "swav-jax plot --workdir /tmp/swav-demo",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("configs", help="list the recipes that --config takes by name")
    p.set_defaults(run=_configs)

    p = sub.add_parser(
        "train",
        help="pretrain (resumes from the latest checkpoint in --workdir)",
        epilog="example: swav-jax train --config demo --workdir /tmp/swav-demo --config.seed=1",
    )
    _add_config_argument(p)
    p.add_argument("--workdir", required=True, help="checkpoints, config.json, metrics.jsonl, TensorBoard events")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this step (schedule unchanged)")
    p.add_argument(
        "--distributed",
        choices=("auto", "off"),
        default="off",
        help="auto: jax.distributed.initialize() from the cluster environment (launch/ scripts set it)",
    )
    p.set_defaults(run=_train)

    p = sub.add_parser(
        "plan",
        help="compile the run for a TPU slice on this machine: HBM, FLOPs, collectives, time (exit 2: does not fit)",
        epilog="example: swav-jax plan --config swav_800ep --topology v5p:4x4x4 --json plan.json",
    )
    _add_config_argument(p)
    p.add_argument("--topology", required=True, help="GENERATION:SHAPE, e.g. v5p:4x4x4 (v5p-128), v5e:8x8")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--num-examples", type=int, default=None,
                   help="training examples per epoch (default: known for imagenet2012, cifar10/100, digits)")
    p.set_defaults(run=_plan)

    p = sub.add_parser(
        "eval",
        help="kNN, linear probe or semi-supervised fine-tuning of a checkpoint",
        epilog="example: swav-jax eval linear --config demo --workdir /tmp/swav-demo",
    )
    p.add_argument("evaluation", choices=("knn", "linear", "finetune"))
    _add_config_argument(p)
    p.add_argument("--workdir", required=True, help="results are appended to WORKDIR/metrics.jsonl")
    p.add_argument("--checkpoint", default=None, help="default: the latest checkpoint in --workdir")
    p.add_argument("--distributed", choices=("auto", "off"), default="off")
    p.add_argument("--protocol", choices=("images", "features"), default=None,
                   help="linear: the release's probe on augmented images (the default; checkpointed in "
                   "WORKDIR/linear_probe) or the fast one on cached centre-crop features")
    p.add_argument("--labels-fraction", type=float, default=None,
                   help="finetune: class-balanced fraction of the training labels (config eval.finetune.labels_fraction)")
    p.add_argument("--subset-file", default=None,
                   help="finetune: the training images to use, one file name per line (e.g. SimCLR's 1percent.txt)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="linear (images) / finetune: stop after this epoch; rerun to continue")
    p.set_defaults(run=_eval)

    p = sub.add_parser(
        "show-crops",
        help="write a grid of the augmented crops of some images",
        epilog="example: swav-jax show-crops photo.jpg --config swav_800ep --out crops.png",
    )
    p.add_argument("images", nargs="+")
    _add_config_argument(p)
    p.add_argument("--out", default="crops.png")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_show_crops)
    p = sub.add_parser("convert", help="import/export the SwAV release's PyTorch checkpoints")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-torch", metavar="CHECKPOINT", help="release-format .pth(.tar) to import")
    direction.add_argument("--to-torch", metavar="DIR", help="converted DIR or orbax checkpoint to export")
    p.add_argument("--out", required=True, help="--from-torch: output DIR; --to-torch: output .pth.tar")
    p.add_argument("--arch", default=None, help="with --from-torch: resnet50, resnet50w2, resnet50w4, resnet50w5")
    p.add_argument("--base-width", type=int, default=64, help="stem width before the multiplier (64)")
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem, no max-pool")
    p.add_argument("--ignore", action="append", default=[], metavar="PREFIX",
                   help="drop state-dict keys starting with PREFIX (e.g. fc. for torch.hub models)")
    p.add_argument("--torch-prefix", default="module.", help="--to-torch: key prefix ('' for a bare model)")
    p.set_defaults(run=_convert)

    p = sub.add_parser("plot", help="PNG plots of WORKDIR/metrics.jsonl (loss, lr, prototype usage, eval)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None, help="output folder (default WORKDIR/plots)")
    p.set_defaults(run=_plot)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = _split_config_overrides(argv)
    args = build_parser().parse_args(rest)
    config_args = ([f"--config={args.config}"] if getattr(args, "config", None) else []) + overrides
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    # jax's INFO lines are probes, not news (e.g. "Unable to initialize backend 'tpu'" on
    # every machine without one); its warnings still show.
    logging.getLogger("jax").setLevel(logging.WARNING)
    from swav_jax.errors import CheckpointError, NonFiniteLossError

    try:
        args.run(args, config_args)
    except (CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError) as e:
        # Bad input gets a message, not a traceback (set SWAV_JAX_TRACEBACK=1 for one).
        if os.environ.get("SWAV_JAX_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        # Orbax's writer tasks that failed with a save repeat their error as they are
        # collected at exit; it has been reported.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
