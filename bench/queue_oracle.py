"""SwAV's queue at small batch, checked step by step against the authors' release.

Trains SwAV as `--config` (with `--config.key=value` overrides, as the CLI) on one
device and, every `--every` steps from `--from-step` on, hands the network's outputs of
that step to the release's own per-iteration code: `train()` and
`distributed_sinkhorn()` of main_swav.py, read at run time from a checkout or a bare
git mirror of github.com/facebookresearch/swav (`--release`; torch needed), with a
stand-in model that returns our outputs (all crops' prototype scores, their
embeddings, the prototypes) and an optimiser that does nothing, one process
(all_reduce is the identity). Nothing of the release is copied here: its functions are
compiled from its file.

Per checked step (JSONL, `--out`), the release against us on the same outputs:
  loss          the release's loss vs our step's train/loss
  codes         max |release - ours| over the assigning crops' codes (ours:
                swav_jax.losses.assign_codes, with the queue when ours uses it)
  queue         max |release's queue after its iteration - ours after our step|
  used          prototypes picked (argmax) by the batch's codes, release and ours
and, to see why a run collapses:
  batch_queue_cos  cosine between the mean embedding of the batch's assigning crops and
                   that of the queue (stale embeddings drift away from the batch: < 1)
  top_share        share of the batch's codes on its most used prototype
                   (1 / K when balanced, 1 when collapsed)
  queue_mass       of the prototype the batch uses most, the share of its Sinkhorn mass
                   on the batch's rows (the queue's rows hold the rest)

    python bench/queue_oracle.py --release /path/to/swav --out oracle.jsonl --steps 1500 \\
        --every 50 -- --config configs/cifar_cpu.py --config.data.source=folder ...
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import subprocess
import sys
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from swav_jax import losses  # noqa: E402
from swav_jax.cli import load_config  # noqa: E402
from swav_jax.data import pipeline  # noqa: E402
from swav_jax.models import PROTOTYPES_PREFIX, build_model, normalize_prototypes  # noqa: E402
from swav_jax.train import optim  # noqa: E402
from swav_jax.train.loop import build_method  # noqa: E402
from swav_jax.train.mesh import make_mesh  # noqa: E402
from swav_jax.train.step import augment_views, queue_start_step  # noqa: E402


def _read_release_file(release: str, path: str) -> str:
    if os.path.isfile(os.path.join(release, path)):
        with open(os.path.join(release, path)) as f:
            return f.read()
    # A bare git directory (the fetch tool's mirror).
    return subprocess.run(
        ["git", "--git-dir", release, "show", f"HEAD:{path}"], capture_output=True, text=True, check=True
    ).stdout


def _functions(source: str, names: set[str]) -> ast.Module:
    tree = ast.parse(source)
    keep = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = names - {n.name for n in keep}
    if missing:
        raise SystemExit(f"error: the release's file lacks {sorted(missing)}")
    return ast.Module(body=keep, type_ignores=[])


class _NoDist:
    """torch.distributed for one process: all_reduce over one rank is the identity."""

    @staticmethod
    def all_reduce(tensor, *args, **kwargs):
        del args, kwargs
        return tensor


class Release:
    """The release's `train` iteration and `distributed_sinkhorn`, compiled from its file."""

    def __init__(self, release: str, config):
        swav = config.swav
        self.args = types.SimpleNamespace(
            crops_for_assign=list(swav.crops_for_assign),
            nmb_crops=list(config.crops.num_crops),
            temperature=float(swav.temperature),
            epsilon=float(swav.epsilon),
            sinkhorn_iterations=int(swav.sinkhorn_iterations),
            world_size=1,
            rank=0,
            use_fp16=False,
            freeze_prototypes_niters=0,  # freezing acts on gradients, not on this check
        )
        namespace = {
            "torch": torch, "np": np, "nn": torch.nn, "F": torch.nn.functional, "time": time,
            "dist": _NoDist, "args": self.args, "logger": logging.getLogger("release"),
        }
        utils = _functions(_read_release_file(release, "src/utils.py"), {"AverageMeter"})
        exec(compile(utils, "swav/src/utils.py", "exec"), namespace)
        main = _functions(_read_release_file(release, "main_swav.py"), {"train", "distributed_sinkhorn"})
        exec(compile(main, "swav/main_swav.py", "exec"), namespace)
        self.codes: list[torch.Tensor] = []
        sinkhorn = namespace["distributed_sinkhorn"]

        def recording_sinkhorn(out):  # train() looks the name up at call time
            q = sinkhorn(out)
            self.codes.append(q.detach().clone())
            return q

        namespace["distributed_sinkhorn"] = recording_sinkhorn
        self._train = namespace["train"]

    def iteration(self, scores: np.ndarray, embeddings: np.ndarray, prototypes: np.ndarray, queue):
        """One release iteration on our outputs.

        scores [V, B, K], embeddings [V, B, D], prototypes [D, K] (unit columns), queue
        [A, L, D] or None. Returns (loss, codes [A, L + B, K] of the whole Sinkhorn problem,
        queue rows first (L = 0 while the queue is not in use), queue after).
        """
        v, b, k = scores.shape
        output = torch.tensor(scores.reshape(v * b, k), requires_grad=True)
        embedding = torch.tensor(embeddings.reshape(v * b, -1))
        proto = torch.nn.Linear(prototypes.shape[0], k, bias=False)
        with torch.no_grad():
            proto.weight.copy_(torch.tensor(prototypes.T))

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.module = types.SimpleNamespace(prototypes=proto)

            def forward(self, inputs):
                del inputs
                return embedding, output

        group = {"lr": 0.0}
        optimizer = types.SimpleNamespace(
            param_groups=[group], optim=types.SimpleNamespace(param_groups=[group]),
            zero_grad=lambda: None, step=lambda: None,
        )
        torch_queue = None if queue is None else torch.tensor(np.array(queue))
        self.codes = []
        (_, loss), torch_queue = self._train([[torch.zeros(b, 1)]], Model(), optimizer, 0, [0.0], torch_queue)
        codes = np.stack([q.numpy() for q in self.codes])
        return float(loss), codes, None if torch_queue is None else torch_queue.numpy()


def _our_outputs(config, model, mesh, data_axes, state, crops):
    """Our step's forward, outside the step: (scores [V, B, K], embeddings [V, B, D], params)."""
    dtype = jnp.dtype(config.model.dtype)
    augment = jax.jit(jax.shard_map(
        lambda rng, step, c: augment_views(rng, step, c, config.augment, dtype=dtype, data_axis=data_axes),
        mesh=mesh, in_specs=(P(), P(), P(None, data_axes)), out_specs=P(None, data_axes), check_vma=False,
    ))
    # To host and back: plain arrays, without the mesh's explicit sharding.
    images = [jnp.asarray(np.asarray(x)) for x in augment(state.rng, state.step, tuple(crops))]
    params = normalize_prototypes(state.params)
    (embeddings, scores), _ = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    return np.asarray(scores[0]), np.asarray(embeddings), jax.device_get(params)


def _usage(codes: np.ndarray) -> tuple[int, float]:
    choice = codes.reshape(-1, codes.shape[-1]).argmax(-1)
    counts = np.bincount(choice, minlength=codes.shape[-1])
    return int((counts > 0).sum()), float(counts.max() / counts.sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", required=True, help="facebookresearch/swav checkout or bare git dir")
    parser.add_argument("--out", required=True, help="JSONL written here")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--from-step", type=int, default=0)
    parser.add_argument("config_args", nargs=argparse.REMAINDER, help="after --: --config FILE and overrides")
    args = parser.parse_args(argv)
    config_args = [a for a in args.config_args if a != "--"]
    config_args = [f"--config={a}" if i and config_args[i - 1] == "--config" else a
                   for i, a in enumerate(config_args)]
    config = load_config([a for a in config_args if a != "--config"])
    config = config.copy_and_resolve_references()
    if jax.device_count() != 1:
        raise SystemExit("error: run on one device (the release runs as one process here)")

    mesh, data_axes, bn_group_axis = make_mesh(config)
    data = pipeline.make_train_iterator(config, mesh=mesh, data_axis=data_axes)
    steps_per_epoch = pipeline.steps_per_epoch(config, data.num_examples)
    schedule = optim.lr_schedule(config.optim, steps_per_epoch=steps_per_epoch, epochs=int(config.epochs),
                                 batch_size=int(config.batch_size))
    state, train_step = build_method(
        config, schedule, mesh, steps_per_epoch=steps_per_epoch,
        total_steps=int(config.epochs) * steps_per_epoch, data_axis=data_axes, bn_group_axis=bn_group_axis,
    )
    model = build_model(config.model)
    release = Release(args.release, config)
    swav = config.swav
    queue_start = queue_start_step(config, steps_per_epoch) if int(swav.queue_length) else None
    print(f"{args.steps} steps, {steps_per_epoch} per epoch; queue of {swav.queue_length} from step {queue_start}",
          flush=True)
    worst = {"loss": 0.0, "codes": 0.0, "queue": 0.0}
    with open(args.out, "w") as out:
        for step in range(args.steps):
            batch = next(data)
            check = step >= args.from_step and step % args.every == 0
            if check:
                scores, embeddings, params = _our_outputs(config, model, mesh, data_axes, state, batch["crops"])
                kernel = np.asarray(params[f"{PROTOTYPES_PREFIX}0"]["kernel"])
                queue_before = None if state.queue is None else np.asarray(jax.device_get(state.queue))
                # The release keeps no queue before its start epoch.
                release_queue = queue_before if queue_start is not None and step >= queue_start else None
                loss_r, codes_full, queue_r = release.iteration(scores, embeddings, kernel, release_queue)
                codes_r = codes_full[:, -scores.shape[1]:]
                in_use = queue_before is not None and bool(np.all(np.any(queue_before[:, -1] != 0, axis=-1)))
                ours = losses.assign_codes(
                    jnp.asarray(scores), crops_for_assign=tuple(swav.crops_for_assign), epsilon=swav.epsilon,
                    num_iters=swav.sinkhorn_iterations,
                    queue_scores=jnp.asarray(queue_before @ kernel) if in_use else None,
                )
                ours = np.asarray(ours)
            state, metrics = train_step(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not check:
                continue
            b = scores.shape[1]
            assign = np.asarray(swav.crops_for_assign)
            record = {
                "step": step,
                "queue_in_use": in_use,
                "loss_ours": metrics["train/loss"],
                "loss_release": loss_r,
                "codes_max_abs_diff": float(np.max(np.abs(codes_r - ours))),
                "used_release": _usage(codes_r)[0],
                "used_ours": _usage(ours)[0],
                "top_share": _usage(codes_r)[1],
                "empty_prototypes": metrics["train/empty_prototypes"],
                "assignment_entropy": metrics["train/assignment_entropy"],
                "lr": metrics["train/lr"],
            }
            if queue_r is not None:
                record["queue_max_abs_diff"] = float(np.max(np.abs(queue_r - np.asarray(jax.device_get(state.queue)))))
            if in_use:
                batch_mean = embeddings[assign].reshape(-1, embeddings.shape[-1]).mean(0)
                queue_mean = queue_before.reshape(-1, queue_before.shape[-1]).mean(0)
                record["batch_queue_cos"] = float(
                    batch_mean @ queue_mean / (np.linalg.norm(batch_mean) * np.linalg.norm(queue_mean))
                )
                # The release's codes of the whole problem (queue rows first), first assigning crop.
                whole = codes_full[0]
                top = np.bincount(whole[-b:].argmax(-1), minlength=whole.shape[-1]).argmax()
                record["queue_mass"] = float(whole[-b:, top].sum() / whole[:, top].sum())
            worst["loss"] = max(worst["loss"], abs(record["loss_ours"] - record["loss_release"]))
            worst["codes"] = max(worst["codes"], record["codes_max_abs_diff"])
            worst["queue"] = max(worst["queue"], record.get("queue_max_abs_diff", 0.0))
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
    print(f"largest differences, release vs ours: loss {worst['loss']:.3g}, codes {worst['codes']:.3g}, "
          f"queue {worst['queue']:.3g}")
    data.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
