"""Collects bench/accelerator.sh's stage results into a few files and a compact table.

    python bench/accel_report.py WORK OUTDIR [--smoke] [--budget S] [--started EPOCH_S]
                                 [--main-crops 2x224+6x96] [--print]

WORK holds what the stages wrote: stages.tsv (one line per stage: name, status, exit
code, seconds, time limit, command), <stage>.json and <stage>.log, nvidia_smi.csv,
profile/ (jax.profiler trace and HLO) and profile_ops.json (bench/profile_summary.py).
Writes into OUTDIR, replacing each file whole, so that OUTDIR stays at six files
whatever the number of stages (the device tool brings back at most 8):
  summary.json      run info (device, versions, date), every stage with its status and
                    its JSON, the table's rows and the targets
  table.md          the compact table and the targets, as printed
  raw.tar.gz        WORK's stage JSONs and logs
  profile.tar.gz    WORK/profile, under 15 MiB: the trace.json.gz copy, then the HLO text
                    are left out to fit, and the file is dropped when the xplane trace
                    alone is over (summary.json's info.profile says which)
  profile_ops.json  per-op device times of the profiled point
(accelerator.log, the sixth, is the script's own log.)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import step_common  # noqa: E402

PROFILE_LIMIT = 15 * 2**20  # the device tool brings back files of at most 16 MiB
PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "numpy", "grain",
            "ml-collections", "array-record", "torch", "torchvision", "pillow")

# (column header, row key, format)
COLUMNS = (
    ("stage", "stage", "s"),
    ("run", "run", "s"),
    ("crops", "crops", "s"),
    ("batch", "per_device_batch", "d"),
    ("ms", "ms", ".3f"),
    ("img/s", "img_per_s", ".1f"),
    ("MFU %", "mfu_percent", ".1f"),
    ("peak GB", "peak_gb", ".2f"),
    ("compile s", "compile_s", ".0f"),
    ("note", "note", "s"),
)


def read_stages(work: str) -> list[dict]:
    """stages.tsv's lines with each stage's JSON (None when it wrote none)."""
    stages = []
    path = os.path.join(work, "stages.tsv")
    if not os.path.exists(path):
        return stages
    with open(path) as f:
        for line in f:
            name, status, rc, seconds, limit, command = line.rstrip("\n").split("\t", 5)
            result = None
            json_path = os.path.join(work, f"{name}.json")
            if os.path.exists(json_path):
                try:
                    with open(json_path) as jf:
                        result = json.load(jf)
                except json.JSONDecodeError as e:  # a stage killed while writing
                    result = {"error": f"unreadable JSON: {e}"}
            stages.append({"name": name, "status": status, "rc": int(rc), "seconds": float(seconds),
                           "limit_s": float(limit), "command": command, "result": result})
    return stages


def _step_rows(stage: dict) -> list[dict]:
    result = stage["result"] or {}
    rows = []
    for r in result.get("rows", []):
        row = {"stage": stage["name"], "run": r.get("mode", ""), "crops": r.get("crops"),
               "per_device_batch": r.get("per_device_batch"), "ms": r.get("step_ms"),
               "img_per_s": r.get("img_per_s"), "peak_gb": r.get("peak_gb"), "compile_s": r.get("compile_s"),
               "mfu_percent": None if r.get("mfu") is None else 100 * r["mfu"], "note": r.get("note", "")}
        if stage["name"].startswith("torch"):
            row["run"] = f"torch {r.get('dtype', '')}".strip()
        elif row["run"] == "synthetic":
            row["run"] = f"jax {r.get('dtype', '')}".strip()
        rows.append(row)
    return rows


def _pipeline_rows(stage: dict) -> list[dict]:
    r = stage["result"] or {}
    rows = [{"stage": stage["name"], "run": "host, 1 core", "img_per_s": r.get("host_img_per_s_per_core"),
             "note": "decode + crop boxes (MultiCrop.sample)"}]
    rows += [{"stage": stage["name"], "run": f"grain, {k.rsplit('_', 1)[1]} workers", "img_per_s": v,
              "note": "whole host pipeline"}
             for k, v in r.items() if k.startswith("grain_img_per_s_workers_")]
    if "device_img_per_s" in r:
        rows.append({"stage": stage["name"], "run": "device crop + augment", "img_per_s": r["device_img_per_s"],
                     "note": f"crop {r.get('device_crop_img_per_s')}, augment {r.get('device_augment_img_per_s')} img/s"})
    return rows


def table_rows(stages: list[dict]) -> list[dict]:
    """One row per measurement; a stage without results gives one row saying why."""
    rows = []
    for stage in stages:
        if stage["name"] == "sinkhorn":
            found = [{"stage": "sinkhorn", "run": r["implementation"], "ms": r["ms"]}
                     for r in (stage["result"] or {}).get("rows", [])]
        elif stage["name"] == "pipeline":
            found = _pipeline_rows(stage) if stage["result"] else []
        elif stage["name"] == "profile_ops":
            planes = (stage["result"] or {}).get("planes", [])
            found = [{"stage": "profile_ops", "run": p["plane"], "ms": p["busy_ms"],
                      "note": f"busy per step, {100 * (p['busy_fraction'] or 0):.0f}% of the span; top: "
                              + ", ".join(f"{o['name']} {100 * (o['share'] or 0):.0f}%" for o in p["ops"][:3])}
                     for p in planes]
        else:
            found = _step_rows(stage)
        if stage["status"] != "ok" or not found:
            why = {"timeout": f"timed out at {stage['limit_s']:.0f} s", "skipped": "skipped: too little time left",
                   "failed": f"failed, exit status {stage['rc']} (see {stage['name']}.log)"}.get(stage["status"], "")
            if stage["status"] == "ok":
                why = "no results written"
            rows.append({"stage": stage["name"], "note": why})
        rows.extend(found)
    return rows


def _find(rows, stage_prefix, run_prefix, **match):
    return [r for r in rows if r["stage"].startswith(stage_prefix) and (r.get("run") or "").startswith(run_prefix)
            and all(r.get(k) == v for k, v in match.items()) and r.get("ms") is not None]


def targets(rows: list[dict], main_crops: str | None) -> list[str]:
    """The issue's targets, each as 'measured ... (target ...)'; only what was measured."""
    out = []
    jax_rows = _find(rows, "jax_main", "jax", crops=main_crops)
    torch_rows = _find(rows, "torch_main", "torch", crops=main_crops)
    for r in jax_rows:
        b = r["per_device_batch"]
        line = f"JAX {main_crops} batch {b}: {r['img_per_s']:.0f} img/s (target >= 1000)"
        if r.get("peak_gb") is not None:
            line += f", peak {r['peak_gb']:.2f} GB" + (" (target < 16 at batch 64)" if b == 64 else "")
        same = [t for t in torch_rows if t["per_device_batch"] == b]
        if same:
            line += f"; JAX / PyTorch {same[0]['run']} = {r['img_per_s'] / same[0]['img_per_s']:.2f} (target >= 1.3)"
        out.append(line)
    for r in _find(rows, "sinkhorn", "jax"):
        out.append(f"Sinkhorn {r['run']}: {r['ms']:.3f} ms (target <= 0.2)")
    e2e = {r["run"]: r for r in rows if r["stage"] == "e2e" and r.get("img_per_s")}
    if "e2e" in e2e and "jax bfloat16" in e2e:
        ratio = e2e["e2e"]["img_per_s"] / e2e["jax bfloat16"]["img_per_s"]
        out.append(f"end to end / synthetic (same process, batch {e2e['e2e'].get('per_device_batch')}): "
                   f"{ratio:.2f} (target >= 0.9)")
    host = [r for r in rows if r["stage"] == "pipeline" and r["run"] == "host, 1 core" and r.get("img_per_s")]
    if host and jax_rows:
        best = max(r["img_per_s"] for r in jax_rows)
        out.append(f"host cores to feed {best:.0f} img/s at {host[0]['img_per_s']:.0f} img/s per core: "
                   f"{best / host[0]['img_per_s']:.1f} (decode + crop boxes only)")
    return out


def render(info: dict, rows: list[dict], lines: list[str]) -> str:
    head = [f"swav-jax accelerator run: {info.get('device', '?')}, {info['date']}"
            + (" -- SMOKE RUN (tiny sizes; no number here is an accelerator measurement)" if info["smoke"] else ""),
            "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v != "missing"),
            f"elapsed {info['elapsed_s']:.0f} s of a {info['budget_s']:.0f} s budget; {info.get('profile', '')}",
            "",
            "| " + " | ".join(c[0] for c in COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS)]
    body = ["| " + " | ".join(step_common._fmt(r.get(key), spec) for _, key, spec in COLUMNS) + " |" for r in rows]
    tail = ["", "targets:"] + [f"- {line}" for line in lines] if lines else []
    return "\n".join(head + body + tail) + "\n"


def run_info(work: str, smoke: bool, budget: float, started: float | None) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "smoke": smoke, "budget_s": budget, "host": step_common.cpu_model(), "python": platform.python_version(),
            "versions": versions}
    info["elapsed_s"] = time.time() - started if started else 0.0
    smi = os.path.join(work, "nvidia_smi.csv")
    if os.path.exists(smi):
        with open(smi) as f:
            info["nvidia_smi"] = f.read().strip()
    return info


def _replace(path: str, write) -> None:
    """Writes path via a temporary file beside it, so a killed run leaves no half file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def _tar(path: str, root: str, members: list[str]) -> None:
    def write(tmp):
        with tarfile.open(tmp, "w:gz") as tar:
            for m in members:
                tar.add(os.path.join(root, m), arcname=m)
    _replace(path, write)


def pack_raw(work: str, outdir: str) -> None:
    members = sorted(f for f in os.listdir(work) if f.endswith((".json", ".log", ".tsv", ".csv", ".txt")))
    _tar(os.path.join(outdir, "raw.tar.gz"), work, members)


def pack_profile(work: str, outdir: str) -> str:
    """profile.tar.gz of WORK/profile, under PROFILE_LIMIT; returns what it holds.

    Packs only when WORK/profile changed since the last packing (the note is kept in
    WORK/profile_pack.txt), since a big trace takes seconds to compress.
    """
    src, note_path = os.path.join(work, "profile"), os.path.join(work, "profile_pack.txt")
    if not os.path.isdir(src):
        return "no profile"
    dest = os.path.join(outdir, "profile.tar.gz")
    files = sorted(os.path.relpath(os.path.join(d, f), work) for d, _, fs in os.walk(src) for f in fs)
    newest = max((os.path.getmtime(os.path.join(work, f)) for f in files), default=0)
    if os.path.exists(dest) and os.path.exists(note_path) and os.path.getmtime(dest) >= newest:
        with open(note_path) as f:
            return f.read()
    note = "profile.tar.gz left out: over 15 MiB even with the trace alone"
    for holds, keep in (
        ("everything", lambda f: True),
        ("all but *.trace.json.gz (left out to fit 15 MiB)", lambda f: not f.endswith(".trace.json.gz")),
        ("the *.xplane.pb trace only (the rest left out to fit 15 MiB)", lambda f: f.endswith(".xplane.pb")),
    ):
        _tar(dest, work, [f for f in files if keep(f)])
        if os.path.getsize(dest) <= PROFILE_LIMIT:
            note = f"profile.tar.gz holds {holds} of profile/: {os.path.getsize(dest) / 2**20:.1f} MiB"
            break
    else:
        os.remove(dest)
    with open(note_path, "w") as f:
        f.write(note)
    return note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work")
    p.add_argument("outdir")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--budget", type=float, default=0.0)
    p.add_argument("--started", type=float, default=None, help="the run's start, seconds since the epoch")
    p.add_argument("--main-crops", default=None, help="the crop setting the targets are about")
    p.add_argument("--print", action="store_true", help="print the table")
    args = p.parse_args()
    if not os.path.isdir(args.work):
        p.error(f"WORK {args.work!r} is not a folder")
    os.makedirs(args.outdir, exist_ok=True)

    stages = read_stages(args.work)
    ops_path = os.path.join(args.work, "profile_ops.json")
    info = run_info(args.work, args.smoke, args.budget, args.started)
    devices = [s["result"]["info"]["device"] for s in stages
               if isinstance((s["result"] or {}).get("info"), dict) and "device" in s["result"]["info"]]
    if devices:
        info["device"] = devices[0]
    rows = table_rows(stages)
    lines = targets(rows, args.main_crops)
    info["profile"] = pack_profile(args.work, args.outdir)
    if os.path.exists(ops_path):
        shutil.copyfile(ops_path, os.path.join(args.outdir, "profile_ops.json"))
    pack_raw(args.work, args.outdir)
    text = render(info, rows, lines)

    def write_summary(tmp):
        with open(tmp, "w") as f:
            json.dump({"info": info, "stages": stages, "table": rows, "targets": lines}, f, indent=1)

    def write_table(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _replace(os.path.join(args.outdir, "summary.json"), write_summary)
    _replace(os.path.join(args.outdir, "table.md"), write_table)
    if args.print:
        print(text, end="")


if __name__ == "__main__":
    main()
