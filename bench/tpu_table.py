"""docs/TPU.md's table: every recipe in swav_jax/configs planned for the slices people rent.

For each pretraining recipe (`swav-jax configs`, but base, which swav_800ep is, the
semi-supervised fine-tuning ones, and those that read an image folder, such as cifar_cpu,
for a CPU) and slice (v5p-128 = v5p:4x4x4, v5p-256 = v5p:4x4x8, v5e-64 = v5e:8x8, v6e-64 =
v6e:8x8, v4-128 = v4:4x4x4) this runs `swav-jax plan --json` in a subprocess, one at a
time: a ResNet-50 train step takes minutes of CPU time to compile. Recipes that differ
only in `epochs` compile once (the same step; the hours scale with the epochs). Each
plan's JSON (and what the command printed, as .txt) is kept in --out, so an interrupted
run resumes where it stopped (a plan that stopped with an error is run again); with
--write-docs, a row already planned in the document (on another machine) whose plan is
not in --out stays as it is.

Usage (from the repository root, with the tpu extra installed):
  nice -n 15 python bench/tpu_table.py --out /tmp/tpu_plans [--write-docs docs/TPU.md]
      [--recipes swav_800ep ...] [--slices v5p-128 ...] [--table-only]

Prints the markdown table (and writes it between the table markers of --write-docs),
and each plan's wall time as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from swav_jax import configs
from swav_jax.cli import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLICES = {  # Cloud accelerator type -> topology
    "v5p-128": "v5p:4x4x4",
    "v5p-256": "v5p:4x4x8",
    "v5e-64": "v5e:8x8",
    "v6e-64": "v6e:8x8",
    "v4-128": "v4:4x4x4",
}
# Recipes for `swav-jax eval finetune` (a pretrained network fine-tuned on a fraction of
# the labels): they have no pretraining run to plan.
FINETUNING = "swav_semisup_"
BEGIN, END = "<!-- tpu_table:begin -->", "<!-- tpu_table:end -->"


def program_groups(names: list[str]) -> dict[str, list[str]]:
    """Recipes whose configs are equal but for `epochs`, keyed by the first of them; those
    that read an image folder are left out."""
    groups: dict[str, list[str]] = {}
    keys: dict[str, str] = {}
    for name in names:
        config = load_config([f"--config={name}"]).to_dict()
        if config["data"]["source"] == "folder":
            continue
        config.pop("epochs")
        key = json.dumps(config, sort_keys=True, default=str)
        first = keys.setdefault(key, name)
        groups.setdefault(first, []).append(name)
    return groups


def run_plan(name: str, topology: str, out: str) -> dict:
    """The plan's JSON (from a fresh process), or {'error': ...} when it stopped before
    compiling (e.g. the batch does not divide over the chips).

    A plan already in `out` is reused, but not an error: an error may have been
    transient (libtpu's lockfile held by another process), and one from the config's
    checks costs seconds to find again, since it stops before anything compiles."""
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
        if "error" not in result:
            return result
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "swav_jax", "plan", "--config", name, "--topology", topology, "--json", out],
        cwd=ROOT, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    with open(out.removesuffix(".json") + ".txt", "w") as f:  # what the command printed
        f.write(proc.stdout)
    if proc.returncode not in (0, 2) or not os.path.exists(out):
        lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
        result = {"error": lines[-1]}
        with open(out, "w") as f:
            json.dump(result, f)
    else:
        with open(out) as f:
            result = json.load(f)
    result["plan_wall_s"] = round(seconds, 1)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{name} on {topology}: {seconds:.0f} s ({'fits' if result.get('fits') else 'does not fit or run'})",
          file=sys.stderr, flush=True)
    return result


def row(recipe: str, epochs: int, accel: str, r: dict | None) -> str:
    if r is None:
        return f"| {recipe} | {accel} | | not planned yet | | | | |"
    if "error" in r:
        return f"| {recipe} | {accel} | - | does not run: {r['error'].removeprefix('error: ')} | | | | |"
    hbm = "-" if r["hbm_per_chip_gib"] is None else f"{r['hbm_per_chip_gib']:.1f} / {r['usable_hbm_gib']:.1f}"
    if not r["fits"]:
        return f"| {recipe} | {accel} | {r['per_chip_batch']} | **no** | {hbm} | | | |"
    steps = epochs * r["steps_per_epoch"]
    hours = steps * r["step_time_s_est"] / 3600
    return (f"| {recipe} | {accel} | {r['per_chip_batch']} | yes | {hbm} | {r['xla_tflop_per_chip_step']:.3g} | "
            f"{r['images_per_sec_est']:,.0f} | {hours:,.1f} ({hours * r['chips']:,.0f}) |")


def documented_rows(text: str) -> dict[tuple[str, str], str]:
    """The planned rows already in a document's table, by (recipe, slice): a row whose plan
    is not in --out (planned on another machine) stays as it was instead of going back
    to "not planned yet"."""
    if BEGIN not in text:
        return {}
    rows = {}
    for line in text.split(BEGIN, 1)[1].split(END, 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] not in ("recipe", "---") and cells[3] != "not planned yet":
            rows[cells[0], cells[1]] = line
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the plans' JSON (reused when present)")
    parser.add_argument("--write-docs", default=None, metavar="MD", help="replace the table between the markers")
    parser.add_argument("--recipes", nargs="+", default=None, metavar="NAME",
                        help="plan only these recipes (default: all); the table still lists every one")
    parser.add_argument("--slices", nargs="+", default=None, choices=tuple(SLICES), metavar="SLICE",
                        help=f"plan only these slices (default: all of {', '.join(SLICES)})")
    parser.add_argument("--table-only", action="store_true", help="plan nothing: the table from the plans in --out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    groups = program_groups([n for n in configs.names() if n != "base" and not n.startswith(FINETUNING)])
    wanted = set(args.recipes or configs.names())
    results = {}
    for first, members in groups.items():
        for accel, topology in SLICES.items():
            out = os.path.join(args.out, f"{first}__{accel}.json")
            if not args.table_only and wanted & set(members) and accel in (args.slices or SLICES):
                results[first, accel] = run_plan(first, topology, out)
            elif os.path.exists(out):
                with open(out) as f:
                    results[first, accel] = json.load(f)
    lines = [
        "| recipe | slice | images per chip | fits | HBM GiB per chip (of usable) | TFLOP per chip and step | "
        "est. images/s | est. hours (chip-hours) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    text = ""
    if args.write_docs:
        with open(args.write_docs) as f:
            text = f.read()
    kept = documented_rows(text)
    for first, members in groups.items():
        for name in members:
            epochs = int(load_config([f"--config={name}"]).epochs)
            for accel in SLICES:
                plan = results.get((first, accel))
                line = row(name, epochs, accel, plan)
                lines.append(line if plan is not None else kept.get((name, accel), line))
    table = "\n".join(lines)
    print(table)
    print(f"\n{len(results)} plans, {time.perf_counter() - start:.0f} s in this run "
          f"(plans reused from {args.out} take none)", file=sys.stderr)
    if args.write_docs:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        with open(args.write_docs, "w") as f:
            f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    main()
