"""Per-op device time from a jax.profiler trace, as JSON: where a step's time goes.

    python bench/profile_summary.py TRACE_DIR [--steps 3] [--top 40] [--json out.json]

Reads every *.xplane.pb under TRACE_DIR (what jax.profiler.trace writes) with
jax.profiler.ProfileData; needs no TensorBoard plugin. For each device plane
(/device:GPU:0, ...) it takes the events on the stream lines (kernels and copies); for a
trace without device planes (XLA:CPU) the host events that name an XLA instruction.
Per plane:
  span_ms, busy_ms  first start to last end, and the union of the events' intervals:
                    busy / span < 1 means the device waited (host dispatch, syncs)
  ops               time by XLA instruction (the events' hlo_op stat, e.g. 'fusion.12',
                    'custom-call.3'; the event's own name when it has none), with the
                    number of events and the share of the plane's event time
  kinds             the same by instruction name without its number ('fusion', ...)
  kernels           time by GPU kernel name (device planes only)
Times and event counts are per step when --steps gives the number of traced steps. The top --top rows of
each list are kept, so the JSON stays small whatever the trace's size.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys

# Lines the profiler derives from the stream events (their time would count twice).
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Framework", "TensorFlow", "Source code")


def _stats(event) -> dict:
    try:
        return dict(event.stats)
    except Exception:  # a stat the bindings cannot convert: the name alone still counts
        return {}


def _busy_ns(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy


def _top(counter: dict, counts: dict, total: float, top: int, steps: int) -> list[dict]:
    rows = sorted(counter.items(), key=lambda kv: -kv[1])[:top]
    return [{"name": k, "ms": v / 1e6 / steps, "count": counts[k] / steps, "share": v / total if total else None}
            for k, v in rows]


def _plane_events(plane) -> tuple[list, bool]:
    """(events to count, is a device plane)."""
    if plane.name.startswith("/device:"):
        lines = [ln for ln in plane.lines if not ln.name.startswith(_DERIVED_LINES)]
        streams = [ln for ln in lines if ln.name.startswith("Stream")]
        return [e for ln in (streams or lines) for e in ln.events], True
    return [e for ln in plane.lines for e in ln.events if "hlo_op" in _stats(e)], False


def summarize_plane(plane, *, top: int = 40, steps: int = 1) -> dict | None:
    events, device = _plane_events(plane)
    events = [e for e in events if e.duration_ns > 0]
    if not events:
        return None
    ops, op_n = collections.Counter(), collections.Counter()
    kinds, kind_n = collections.Counter(), collections.Counter()
    kernels, kernel_n = collections.Counter(), collections.Counter()
    intervals = []
    for e in events:
        d = e.duration_ns
        op = str(_stats(e).get("hlo_op", e.name))
        kind = re.sub(r"[._]\d+$", "", op)
        ops[op] += d
        op_n[op] += 1
        kinds[kind] += d
        kind_n[kind] += 1
        if device:
            kernels[e.name] += d
            kernel_n[e.name] += 1
        intervals.append((e.start_ns, e.start_ns + d))
    total = sum(ops.values())
    span = max(e for _, e in intervals) - min(s for s, _ in intervals)
    busy = _busy_ns(intervals)
    out = {
        "plane": plane.name,
        "events": len(events),
        "steps": steps,
        "span_ms": span / 1e6 / steps,
        "busy_ms": busy / 1e6 / steps,
        "busy_fraction": busy / span if span else None,
        "event_ms": total / 1e6 / steps,
        "ops": _top(ops, op_n, total, top, steps),
        "kinds": _top(kinds, kind_n, total, top, steps),
    }
    if device:
        out["kernels"] = _top(kernels, kernel_n, total, top, steps)
    return out


def summarize(trace_dir: str, *, top: int = 40, steps: int = 1) -> dict:
    """Summary of every *.xplane.pb under trace_dir (see the module docstring)."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    planes = []
    for path in files:
        data = ProfileData.from_file(path)
        found = [p for p in data.planes if p.name.startswith("/device:")] or \
            [p for p in data.planes if p.name.startswith("/host:CPU")]
        for plane in found:
            summary = summarize_plane(plane, top=top, steps=steps)
            if summary:
                planes.append({"file": os.path.relpath(path, trace_dir), **summary})
    return {"trace_dir": trace_dir, "files": [os.path.relpath(f, trace_dir) for f in files], "planes": planes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (times are divided by it)")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.steps < 1 or args.top < 1:
        p.error("--steps and --top must be >= 1")
    try:
        summary = summarize(args.trace_dir, top=args.top, steps=args.steps)
    except FileNotFoundError as e:
        sys.exit(f"profile_summary: {e}")
    for plane in summary["planes"]:
        busy = plane["busy_fraction"]
        print(f"{plane['plane']}: {plane['events']} events, per step: span {plane['span_ms']:.2f} ms, "
              f"busy {plane['busy_ms']:.2f} ms ({'-' if busy is None else f'{100 * busy:.0f}%'}), "
              f"event time {plane['event_ms']:.2f} ms")
        for row in plane["ops"][:15]:
            print(f"  {row['ms']:9.3f} ms  {100 * (row['share'] or 0):5.1f}%  x{row['count']:<6g} {row['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
