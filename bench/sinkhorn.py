"""Sinkhorn benchmark: swav_jax.sinkhorn vs the release's algorithm in PyTorch and NumPy.

    python bench/sinkhorn.py [--n 4096] [--k 3000] [--iters 3] [--repeats 20] [--devices 8] [--json out.json]

Times (median of --repeats calls after warm-up, blocking on the result):
  jax            swav_jax.sinkhorn, jitted, one device, n x K
  jax-sharded    the same problem as --devices shards of n/devices rows (jax.shard_map,
                 psum over the data axis); on CPU the "devices" share the host's cores
  torch          the release's distributed_sinkhorn, written plainly (when torch is installed)
  numpy          the same in NumPy, float32
"""

import argparse
import json
import os
import statistics
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=3000)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--devices", type=int, default=8, help="shards for the sharded run (host devices on CPU)")
    p.add_argument("--json", default=None, help="also write the medians to this JSON file")
    return p.parse_args()


ARGS = _parse()
if ARGS.devices > 1 and "cuda" not in os.environ.get("JAX_PLATFORMS", ""):
    # Host devices for the sharded run on CPU; ignored by accelerator backends.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from swav_jax import sinkhorn  # noqa: E402


def _median_ms(fn, repeats):
    fn()  # warm-up (and compile)
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _numpy_sinkhorn(scores, epsilon, iters):
    q = np.exp(scores / epsilon).T
    q /= q.sum()
    k, n = q.shape
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    q *= n
    return q.T


def _torch_sinkhorn(torch, scores, epsilon, iters):
    # The release's algorithm, single process (its all_reduce calls are no-ops here).
    with torch.no_grad():
        q = torch.exp(scores / epsilon).t()
        q /= torch.sum(q)
        k, n = q.shape
        for _ in range(iters):
            q /= torch.sum(q, dim=1, keepdim=True)
            q /= k
            q /= torch.sum(q, dim=0, keepdim=True)
            q /= n
        q *= n
        return q.t()


def main():
    a = ARGS
    rng = np.random.default_rng(0)
    z = rng.normal(size=(a.n, 128)).astype(np.float32)
    c = rng.normal(size=(a.k, 128)).astype(np.float32)
    scores = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    print(f"backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__}")
    print(f"n={a.n} K={a.k} iters={a.iters} eps={a.epsilon} float32, median of {a.repeats}")

    device = jax.devices()[0]
    info = {"device": f"{device.platform}: {device.device_kind}", "jax": jax.__version__, "n": a.n, "k": a.k,
            "iters": a.iters, "epsilon": a.epsilon, "repeats": a.repeats}
    results = {}
    x = jax.device_put(jnp.asarray(scores), device)
    fn = jax.jit(lambda s: sinkhorn(s, epsilon=a.epsilon, num_iters=a.iters))
    results["jax"] = _median_ms(lambda: fn(x).block_until_ready(), a.repeats)

    if a.devices > 1 and jax.device_count() >= a.devices and a.n % a.devices == 0:
        mesh = jax.make_mesh((a.devices,), ("data",), devices=jax.devices()[: a.devices])
        sharded = jax.jit(
            jax.shard_map(
                lambda s: sinkhorn(s, epsilon=a.epsilon, num_iters=a.iters, axis_name="data"),
                mesh=mesh,
                in_specs=P("data"),
                out_specs=P("data"),
            )
        )
        xs = jax.device_put(jnp.asarray(scores), NamedSharding(mesh, P("data")))
        results[f"jax-sharded {a.devices}x{a.n // a.devices}"] = _median_ms(
            lambda: sharded(xs).block_until_ready(), a.repeats
        )

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ts = torch.from_numpy(scores).to(device)

        def run_torch():
            _torch_sinkhorn(torch, ts, a.epsilon, a.iters)
            if device == "cuda":
                torch.cuda.synchronize()

        results[f"torch ({device}, {torch.__version__}, {torch.get_num_threads()} threads)"] = _median_ms(
            run_torch, a.repeats
        )
    results["numpy"] = _median_ms(lambda: _numpy_sinkhorn(scores, a.epsilon, a.iters), max(3, a.repeats // 4))

    for name, ms in results.items():
        print(f"{name:48s} {ms:9.3f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "rows": [{"implementation": k, "ms": v} for k, v in results.items()]}, f,
                      indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
