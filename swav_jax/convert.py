"""Import and export the SwAV release's PyTorch checkpoints (facebookresearch/swav).

The release's checkpoints are PyTorch state dicts of its `src/resnet50.py` model, saved
from a DistributedDataParallel wrapper, so every key carries a `module.` prefix. The
released files (e.g. `swav_800ep_pretrain.pth.tar`) are the plain state dict;
`main_swav.py`'s own `checkpoint.pth.tar` wraps it as `{'state_dict': ..., 'epoch': ...}`
(`load_torch_checkpoint` reads both). The torch.hub model is torchvision's `resnet50`:
the same backbone keys without prefix, plus a random `fc` classifier (drop it with
`ignore=('fc.',)`).

Key mapping (release name -> variables path; `s` = 1..4, `b` = 0..):

    conv1.weight                    [O, I, 7, 7]  params/backbone/stem_conv/kernel [7, 7, I, O]
    bn1.weight | bias               [C]           params/backbone/stem_bn/scale | bias
    bn1.running_mean | running_var  [C]           batch_stats/backbone/stem_bn/mean | var
    layer{s}.{b}.conv{i}, bn{i}                   backbone/stage{s}_block{b}/conv{i}, bn{i}
    layer{s}.{b}.downsample.0, .1                 backbone/stage{s}_block{b}/downsample_conv, _bn
    projection_head.0.weight        [H, F]        params/projection_hidden/kernel [F, H] (+ bias)
    projection_head.1.*             [H]           projection_bn (BatchNorm1d, as above)
    projection_head.3.weight        [P, H]        params/projection_out/kernel [H, P] (+ bias)
    projection_head.weight          [P, F]        projection_out when the head has no hidden
                                                  layer (the release's --hidden_mlp 0)
    prototypes.weight               [K, P]        params/prototypes_0/kernel [P, K]
    prototypes.prototypes{h}.weight [K_h, P]      params/prototypes_{h}/kernel, several heads

`num_batches_tracked` (a BN step counter, unused at eval time and by the release's
momentum) is ignored on import and not written on export; PyTorch loads state dicts
without it. Conversions are exact: only transposes, no arithmetic.

Stem padding: the release pads the image by 1 (`ConstantPad2d(1, 0.0)`) and then runs the
7x7/2 conv with padding 2; torchvision and `swav_jax.models` run it with padding 3. Both
pads are zeros, so the three compute the same function and the weights carry over as
they are.

Converted checkpoints on disk (`save_pretrained`, `swav-jax convert --from-torch`):

    DIR/variables/   orbax StandardSave of {'params': ..., 'batch_stats': ...}, the
                     variables of `SwAVModel` (float32)
    DIR/model.json   the `SwAVModel` fields: {"arch", "width", "base_width", "small_stem",
                     "head": {"hidden_dim", "proj_dim", "num_prototypes"} or null for a
                     backbone-only checkpoint}

`load_pretrained(DIR)` gives the model and its variables back; `load_variables` reads the
variables of such a DIR or of any StandardSave holding 'params' and 'batch_stats' at its
top level, such as a training checkpoint's `checkpoints/<step>/state`.

torch is an optional dependency, imported only by the functions that need it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Mapping, Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from swav_jax.models.resnet import ARCHS
from swav_jax.models.swav import PROTOTYPES_PREFIX, SwAVModel

RELEASE_PREFIX = "module."

# HWIO (flax) -> OIHW (PyTorch) for conv kernels; [in, out] -> [out, in] for linear ones.
_TO_TORCH_PERM = {4: (3, 2, 0, 1), 2: (1, 0)}
# Sub-modules of a residual block, in PyTorch's state-dict order.
_BLOCK_MODULES = (
    ("conv1", "conv1"),
    ("bn1", "bn1"),
    ("conv2", "conv2"),
    ("bn2", "bn2"),
    ("conv3", "conv3"),
    ("bn3", "bn3"),
    ("downsample_conv", "downsample.0"),
    ("downsample_bn", "downsample.1"),
)


def parse_arch(name: str) -> tuple[str, int]:
    """'resnet50' -> ('resnet50', 1); 'resnet50w2' -> ('resnet50', 2) (the release's names)."""
    m = re.fullmatch(r"(resnet\d+)(?:w(\d+))?", name)
    if m is None or m[1] not in ARCHS or (m[2] is not None and int(m[2]) < 1):
        raise ValueError(
            f"arch must be one of {sorted(ARCHS)} with an optional width suffix wN "
            f"(e.g. resnet50w2), got {name!r}"
        )
    return m[1], int(m[2] or 1)


def _module_pairs(params: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """(flax module path, PyTorch module name) of every module, in PyTorch's order."""
    pairs = []
    if "backbone" in params:
        backbone = params["backbone"]
        pairs += [(("backbone", "stem_conv"), "conv1"), (("backbone", "stem_bn"), "bn1")]
        for s in range(1, 5):
            b = 0
            while f"stage{s}_block{b}" in backbone:
                block = backbone[f"stage{s}_block{b}"]
                pairs += [
                    (("backbone", f"stage{s}_block{b}", ours), f"layer{s}.{b}.{theirs}")
                    for ours, theirs in _BLOCK_MODULES
                    if ours in block
                ]
                b += 1
    if "projection_hidden" in params:
        pairs += [
            (("projection_hidden",), "projection_head.0"),
            (("projection_bn",), "projection_head.1"),
            (("projection_out",), "projection_head.3"),
        ]
    elif "projection_out" in params:
        pairs.append((("projection_out",), "projection_head"))
    heads = sum(name.startswith(PROTOTYPES_PREFIX) for name in params)
    for h in range(heads):
        theirs = "prototypes" if heads == 1 else f"prototypes.prototypes{h}"
        pairs.append(((f"{PROTOTYPES_PREFIX}{h}",), theirs))
    return pairs


def _entries(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any]
) -> list[tuple[str, str, tuple[str, ...], tuple[int, ...] | None]]:
    """Every state-dict entry of a variables tree, in PyTorch's order.

    Returns (torch name without prefix, collection, flax path, permutation taking the flax
    array to the PyTorch layout or None). Raises ValueError naming any variable that has no
    PyTorch counterpart.
    """
    flat = {
        "params": flax.traverse_util.flatten_dict(params),
        "batch_stats": flax.traverse_util.flatten_dict(batch_stats),
    }
    entries = []
    for path, name in _module_pairs(params):
        if path + ("scale",) in flat["params"]:  # BatchNorm
            leaves = [
                ("params", "scale", "weight", True),
                ("params", "bias", "bias", True),
                ("batch_stats", "mean", "running_mean", True),
                ("batch_stats", "var", "running_var", True),
            ]
        else:  # Conv or Dense; convs and prototypes have no bias
            leaves = [("params", "kernel", "weight", True), ("params", "bias", "bias", False)]
        for collection, ours, theirs, required in leaves:
            leaf = flat[collection].pop(path + (ours,), None)
            if leaf is None:
                if not required:
                    continue
                raise ValueError(f"variables lack {collection}/{'/'.join(path + (ours,))}")
            perm = _TO_TORCH_PERM.get(len(leaf.shape)) if ours == "kernel" else None
            if ours == "kernel" and perm is None:
                raise ValueError(
                    f"{collection}/{'/'.join(path + (ours,))} has shape {leaf.shape}; "
                    "expected a 4-d conv or 2-d linear kernel"
                )
            entries.append((f"{name}.{theirs}", collection, path + (ours,), perm))
    left = [f"{c}/{'/'.join(p)}" for c in flat for p in flat[c]]
    if left:
        raise ValueError(
            f"variables {sorted(left)[:10]} have no counterpart in the release's state dict"
        )
    return entries


def _to_numpy(key: str, value: Any) -> np.ndarray:
    """A float32 NumPy view (no copy where possible) of a torch tensor or array."""
    if hasattr(value, "detach"):  # torch.Tensor; numpy() has no bfloat16
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype != _torch().float32:
            value = value.float()
        value = value.numpy()
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"state dict key {key!r} has dtype {value.dtype}, expected floating point")
    return value.astype(np.float32, copy=False)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("PyTorch checkpoints need torch: pip install 'swav-jax[torch]'") from e
    return torch


def _head_fields(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, Any] | None:
    """hidden_dim, proj_dim, num_prototypes read off the head's keys; None without a head."""
    if not any(k.startswith(("projection_head.", "prototypes.")) for k in shapes):
        return None

    def dim0(name: str) -> int:
        if name not in shapes:
            raise ValueError(f"state dict lacks key {prefix + name!r} (the head is incomplete)")
        if len(shapes[name]) != 2:
            raise ValueError(
                f"state dict key {prefix + name!r} has shape {shapes[name]}, expected a matrix"
            )
        return shapes[name][0]

    if "projection_head.weight" in shapes:  # --hidden_mlp 0: one Linear
        hidden_dim, proj_dim = 0, dim0("projection_head.weight")
    else:
        hidden_dim, proj_dim = dim0("projection_head.0.weight"), dim0("projection_head.3.weight")
    if "prototypes.weight" in shapes:
        num_prototypes = (dim0("prototypes.weight"),)
    else:
        num_prototypes, h = [], 0
        while f"prototypes.prototypes{h}.weight" in shapes:
            num_prototypes.append(dim0(f"prototypes.prototypes{h}.weight"))
            h += 1
        if not num_prototypes:
            dim0("prototypes.weight")  # raises: missing
    return dict(hidden_dim=hidden_dim, proj_dim=proj_dim, num_prototypes=tuple(num_prototypes))


def _abstract_variables(model: SwAVModel, with_head: bool) -> dict[str, Any]:
    """ShapeDtypeStructs of `model`'s variables (backbone only unless `with_head`)."""

    def init():
        key = jax.random.key(0)
        if with_head:
            return model.init(key, [jnp.zeros((1, 1, 32, 32, 3))], train=False)
        return model.init(key, jnp.zeros((1, 32, 32, 3)), method=SwAVModel.features)

    return jax.eval_shape(init)


def torch_state_dict_to_variables(
    state_dict: Mapping[str, Any],
    *,
    arch: str = "resnet50",
    width: int = 1,
    base_width: int = 64,
    small_stem: bool = False,
    ignore: Sequence[str] = (),
) -> dict[str, Any]:
    """Variables of `SwAVModel` from a release-format PyTorch state dict.

    Args:
      state_dict: name -> torch.Tensor (or array), as `torch.load` gives it. Keys may carry
        the `module.` prefix. With `projection_head.*` / `prototypes.*` keys the result
        holds the whole SwAVModel (head sizes read off the weights); without them, the
        backbone only (for `SwAVModel.features`).
      arch, width, base_width, small_stem: the backbone (`SwAVModel` fields); every shape
        is checked against it. The release's resnet50wN is arch='resnet50', width=N.
      ignore: key prefixes (after `module.`) to drop, e.g. ('fc.',) for torchvision's
        classifier.

    Returns:
      {'params': ..., 'batch_stats': ...} nested dicts of float32 NumPy arrays, in flax
      layout (conv kernels HWIO, linear kernels [in, out]). Leaves may be views of the
      input tensors' memory.

    Raises:
      ValueError naming the key: for a key with no counterpart in the model, a key the
      model needs that is missing, or a shape that does not match the model.
    """
    prefix = RELEASE_PREFIX if any(k.startswith(RELEASE_PREFIX) for k in state_dict) else ""
    tensors = {}  # name without prefix -> (key as given, value)
    for key, value in state_dict.items():
        name = key.removeprefix(RELEASE_PREFIX)
        if name.endswith("num_batches_tracked") or name.startswith(tuple(ignore)):
            continue
        if not hasattr(value, "shape"):
            raise ValueError(
                f"state dict key {key!r} holds a {type(value).__name__}, not a tensor; pass the "
                "state dict itself (load_torch_checkpoint unwraps training checkpoints)"
            )
        tensors[name] = (key, value)
    head = _head_fields({n: tuple(v.shape) for n, (_, v) in tensors.items()}, prefix)
    model = SwAVModel(
        arch=arch, width=width, base_width=base_width, small_stem=small_stem, **(head or {})
    )
    expected = _abstract_variables(model, with_head=head is not None)
    described = (
        f"SwAVModel(arch={arch!r}, width={width}, base_width={base_width}, small_stem={small_stem}"
        + "".join(f", {k}={v}" for k, v in (head or {}).items())
        + ")"
    )
    out: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    flat_expected = {c: flax.traverse_util.flatten_dict(expected[c]) for c in out}
    for name, collection, path, perm in _entries(expected["params"], expected["batch_stats"]):
        if name not in tensors:
            raise ValueError(f"state dict lacks key {prefix + name!r}, needed by {described}")
        key, value = tensors.pop(name)
        want = flat_expected[collection][path].shape
        want = tuple(want[i] for i in perm) if perm else tuple(want)
        if tuple(value.shape) != want:
            raise ValueError(
                f"state dict key {key!r} has shape {tuple(value.shape)}; {described} "
                f"needs {want}"
            )
        array = _to_numpy(key, value)
        out[collection][path] = array.transpose(np.argsort(perm)) if perm else array
    if tensors:
        unknown = sorted(key for key, _ in tensors.values())
        raise ValueError(
            f"state dict keys {unknown[:10]}{' ...' if len(unknown) > 10 else ''} have no "
            f"counterpart in {described}; pass ignore=(prefix, ...) (CLI: --ignore PREFIX) "
            "to drop keys on purpose"
        )
    return {c: flax.traverse_util.unflatten_dict(out[c]) for c in out}


def variables_to_torch_state_dict(
    variables: Mapping[str, Any], *, prefix: str = RELEASE_PREFIX
) -> dict[str, Any]:
    """The release-format PyTorch state dict of `SwAVModel` variables (inverse of import).

    Args:
      variables: {'params': ..., 'batch_stats': ...} of a SwAVModel (whole, or backbone
        only), NumPy or jax arrays.
      prefix: prepended to every key; the release's `module.` by default, '' for a bare
        model (torchvision's resnet50 loads the backbone keys with strict=False, missing
        only its `fc`).

    Returns:
      name -> float32 contiguous torch.Tensor (copies), in the release's order, without
      `num_batches_tracked`.
    """
    torch = _torch()
    unknown = set(variables) - {"params", "batch_stats"}
    if unknown or "params" not in variables:
        raise ValueError(
            f"variables must be {{'params': ..., 'batch_stats': ...}}, got keys {sorted(variables)}"
        )
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    flat = {
        "params": flax.traverse_util.flatten_dict(params),
        "batch_stats": flax.traverse_util.flatten_dict(batch_stats),
    }
    state_dict = {}
    for name, collection, path, perm in _entries(params, batch_stats):
        array = np.asarray(flat[collection][path], dtype=np.float32)
        if perm:
            array = array.transpose(perm)
        state_dict[prefix + name] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    return state_dict


def model_for_variables(
    variables: Mapping[str, Any],
    *,
    arch: str = "resnet50",
    width: int = 1,
    base_width: int = 64,
    small_stem: bool = False,
) -> SwAVModel:
    """The `SwAVModel` whose head sizes fit `variables` (default head if backbone-only)."""
    params = variables["params"]
    head = {}
    if "projection_out" in params:
        hidden = params.get("projection_hidden", {}).get("kernel")
        head = dict(
            hidden_dim=0 if hidden is None else int(hidden.shape[1]),
            proj_dim=int(params["projection_out"]["kernel"].shape[1]),
            num_prototypes=tuple(
                int(params[f"{PROTOTYPES_PREFIX}{h}"]["kernel"].shape[1])
                for h in range(sum(n.startswith(PROTOTYPES_PREFIX) for n in params))
            ),
        )
    return SwAVModel(arch=arch, width=width, base_width=base_width, small_stem=small_stem, **head)


def load_torch_checkpoint(path: str) -> dict[str, Any]:
    """The state dict in a `.pth(.tar)` file: plain, or under 'state_dict' (training checkpoints).

    Loads with `weights_only=True` (no pickled code runs) onto the CPU.
    """
    torch = _torch()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return dict(checkpoint)


def save_pretrained(directory: str, model: SwAVModel, variables: Mapping[str, Any]) -> None:
    """Writes DIR/variables (orbax StandardSave) and DIR/model.json (see the module doc)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    for name in ("variables", "model.json"):
        if os.path.exists(os.path.join(directory, name)):
            raise ValueError(
                f"{directory} already holds a converted checkpoint ({name}); pick a new one"
            )
    has_head = "projection_out" in variables["params"]
    config = dict(
        arch=model.arch,
        width=model.width,
        base_width=model.base_width,
        small_stem=model.small_stem,
        head=dict(
            hidden_dim=model.hidden_dim,
            proj_dim=model.proj_dim,
            num_prototypes=list(model.num_prototypes),
        )
        if has_head
        else None,
    )
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(
        os.path.join(directory, "variables"),
        {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})},
    )
    checkpointer.wait_until_finished()
    with open(os.path.join(directory, "model.json"), "w") as f:
        json.dump(config, f, indent=2)


def _host_target(metadata: Any) -> Any:
    """Restore target for a saved tree: every array on this process's first device, so a
    checkpoint written on any device topology (other processes, other meshes) loads."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(metadata, Mapping):
        return {k: _host_target(v) for k, v in metadata.items()}
    if isinstance(metadata, (list, tuple)):
        return type(metadata)(_host_target(v) for v in metadata)
    if metadata is None:
        return None
    return jax.ShapeDtypeStruct(metadata.shape, metadata.dtype, sharding=device)


def _eval_fields(state_dir: str) -> tuple[str, str]:
    """The fields of a training state that hold the network to evaluate or export, as its
    checkpoint's `method` item records them (`train.checkpoint.Checkpointer`)."""
    record = os.path.join(os.path.dirname(state_dir), "method", "metadata")
    if os.path.basename(state_dir) != "state" or not os.path.isfile(record):
        return ("params", "batch_stats")
    with open(record) as f:
        params, batch_stats = json.load(f)["eval_fields"]
    return params, batch_stats


def _unreadable(path: str, error: Exception) -> ValueError:
    from swav_jax.train.checkpoint import describe

    return ValueError(f"cannot read the checkpoint at {path}: {describe(error)}")


def load_variables(path: str) -> dict[str, Any]:
    """{'params', 'batch_stats'} from a converted DIR, or from a training checkpoint's
    `checkpoints/<step>/state` (for ExCB: its EMA teacher, the network it evaluates),
    saved on any device topology."""
    import orbax.checkpoint as ocp
    from etils import epath

    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "variables")):
        path = os.path.join(path, "variables")
    if not os.path.isdir(path):
        raise ValueError(f"no orbax checkpoint at {path}")
    params, batch_stats = _eval_fields(path)
    # The item's handler, not a Checkpointer: `<step>/state` is one item of a step whose
    # checkpoint-level metadata lies a folder up, where a Checkpointer would look for it in vain.
    handler = ocp.StandardCheckpointHandler()
    try:
        saved = handler.metadata(epath.Path(path)).tree
    except Exception as e:  # noqa: BLE001 -- damaged: one line, not TensorStore's traceback
        raise _unreadable(path, e) from e
    if not isinstance(saved, Mapping) or params not in saved:
        raise ValueError(f"the checkpoint at {path} has no top-level {params!r}")
    try:
        restored = handler.restore(epath.Path(path), args=ocp.args.StandardRestore(_host_target(saved)))
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, e) from e
    return {"params": restored[params], "batch_stats": restored.get(batch_stats, {})}


def load_pretrained(directory: str) -> tuple[SwAVModel, dict[str, Any]]:
    """(model, variables) of a DIR written by `save_pretrained` / `swav-jax convert`.

    A backbone-only DIR gives a model with the default head fields: use `model.features`.
    """
    with open(os.path.join(directory, "model.json")) as f:
        config = json.load(f)
    head = config.pop("head") or {}
    if "num_prototypes" in head:
        head["num_prototypes"] = tuple(head["num_prototypes"])
    return SwAVModel(**config, **head), load_variables(directory)


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `swav-jax convert`."""
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-torch", metavar="CHECKPOINT", help="release-format .pth(.tar) state dict to import"
    )
    direction.add_argument(
        "--to-torch", metavar="DIR", help="converted DIR or orbax checkpoint to export"
    )
    parser.add_argument(
        "--out", required=True, help="--from-torch: output DIR; --to-torch: output .pth.tar file"
    )
    parser.add_argument(
        "--arch",
        default=None,
        help="with --from-torch (required): resnet50, resnet50w2, resnet50w4, resnet50w5 "
        "(any of resnet18/34/50/101 with an optional wN width suffix)",
    )
    parser.add_argument(
        "--base-width",
        type=int,
        default=64,
        help="stem width before the multiplier (64 in every released model)",
    )
    parser.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem, no max-pool")
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PREFIX",
        help="drop state-dict keys starting with PREFIX (after module.), e.g. fc. for torch.hub "
        "models; repeatable",
    )
    parser.add_argument(
        "--torch-prefix",
        default=RELEASE_PREFIX,
        help=f"--to-torch: prefix of every key ({RELEASE_PREFIX!r} as the release, '' for a "
        "bare model)",
    )


def main_convert(args: argparse.Namespace) -> None:
    """`swav-jax convert`: one direction, as chosen by --from-torch / --to-torch."""
    if args.from_torch:
        if args.arch is None:
            raise SystemExit("error: --from-torch needs --arch (e.g. resnet50, resnet50w2)")
        arch, width = parse_arch(args.arch)
        variables = torch_state_dict_to_variables(
            load_torch_checkpoint(args.from_torch),
            arch=arch,
            width=width,
            base_width=args.base_width,
            small_stem=args.small_stem,
            ignore=args.ignore,
        )
        model = model_for_variables(
            variables,
            arch=arch,
            width=width,
            base_width=args.base_width,
            small_stem=args.small_stem,
        )
        save_pretrained(args.out, model, variables)
        has_head = "projection_out" in variables["params"]
        parts = "backbone + head + prototypes" if has_head else "backbone"
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
        print(f"wrote {args.out}: {args.arch} ({parts}), {count:,} parameters")
    else:
        if args.arch is not None or args.ignore:
            raise SystemExit("error: --arch and --ignore apply to --from-torch only")
        state_dict = variables_to_torch_state_dict(
            load_variables(args.to_torch), prefix=args.torch_prefix
        )
        _torch().save(state_dict, args.out)
        print(f"wrote {args.out}: {len(state_dict)} tensors")
