"""Tests for swav_jax.models: ResNet trunks, SwAV head/prototypes, multi-crop forward, sync BN.

References are float64 NumPy, written from the architecture description (torchvision
v1.5 ResNet, docs/ALGORITHM.md §3), not from the Flax code. Real forwards use tiny widths
(`base_width`) and small images; big models are only traced with `jax.eval_shape`.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from swav_jax.configs import base
from swav_jax.models import (
    PROTOTYPES_PREFIX,
    SwAVModel,
    build_model,
    normalize_prototypes,
    resnet,
)
from swav_jax.models.resnet import batch_norm
from swav_jax.errors import ConfigError
from swav_jax.mesh import sync_bn_mesh_shape
from swav_jax.train.validate import validate_config

# Blocks per stage and block kind, from the ResNet paper (He et al. 2016, Table 1).
LAYOUTS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
}
EPS = 1e-5
MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch


def _count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _to_np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ----------------------------------------------------------------------------------------
# Float64 NumPy reference of the ResNet trunk (train- or eval-mode BN).


def _np_conv(x, w, stride, pad):
    """x [N, H, W, C], w [kh, kw, C, O], symmetric zero padding, as torch Conv2d."""
    kh, kw = w.shape[:2]
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride
            ]
            out += patch @ w[i, j]
    return out


def _np_maxpool(x):
    """3x3 stride-2 max-pool with padding 1 (padding never wins: -inf)."""
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    out = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    for i in range(3):
        for j in range(3):
            out = np.maximum(out, x[:, i : i + 2 * (ho - 1) + 1 : 2, j : j + 2 * (wo - 1) + 1 : 2])
    return out


def _np_bn(x, params, stats, new_stats, train):
    """BatchNorm over all axes but the last; records updated running stats in new_stats.

    torch.nn.BatchNorm: normalises with the biased batch variance, and updates the running
    variance with the unbiased one (n / (n - 1), n the values per channel).
    """
    axes = tuple(range(x.ndim - 1))
    if train:
        mean, var = x.mean(axes), x.var(axes)
        n = x.size // x.shape[-1]
        new_stats["mean"] = (1 - MOMENTUM) * stats["mean"] + MOMENTUM * mean
        new_stats["var"] = (1 - MOMENTUM) * stats["var"] + MOMENTUM * var * n / (n - 1)
    else:
        mean, var = stats["mean"], stats["var"]
        new_stats.update(stats)
    return (x - mean) / np.sqrt(var + EPS) * params["scale"] + params["bias"]


def np_resnet(params, stats, x, arch, width, base_width, small_stem, train):
    """Pooled features [N, F] and the updated running stats of a torchvision v1.5 ResNet."""
    relu = lambda v: np.maximum(v, 0.0)
    new_stats = {}

    def bn(y, name, scope_p, scope_s, scope_new):
        scope_new[name] = {}
        return _np_bn(y, scope_p[name], scope_s[name], scope_new[name], train)

    if small_stem:
        x = relu(
            bn(
                _np_conv(x, params["stem_conv"]["kernel"], 1, 1),
                "stem_bn",
                params,
                stats,
                new_stats,
            )
        )
    else:
        x = relu(
            bn(
                _np_conv(x, params["stem_conv"]["kernel"], 2, 3),
                "stem_bn",
                params,
                stats,
                new_stats,
            )
        )
        x = _np_maxpool(x)
    stage_sizes, kind = LAYOUTS[arch]
    expansion = 1 if kind == "basic" else 4
    for s, n in enumerate(stage_sizes):
        planes = base_width * width * 2**s
        for b in range(n):
            name = f"stage{s + 1}_block{b}"
            p, st = params[name], stats[name]
            new_stats[name] = ns = {}
            stride = 2 if (s > 0 and b == 0) else 1
            if kind == "basic":
                y = relu(bn(_np_conv(x, p["conv1"]["kernel"], stride, 1), "bn1", p, st, ns))
                y = bn(_np_conv(y, p["conv2"]["kernel"], 1, 1), "bn2", p, st, ns)
            else:  # v1.5: the stride sits on the 3x3 conv
                y = relu(bn(_np_conv(x, p["conv1"]["kernel"], 1, 0), "bn1", p, st, ns))
                y = relu(bn(_np_conv(y, p["conv2"]["kernel"], stride, 1), "bn2", p, st, ns))
                y = bn(_np_conv(y, p["conv3"]["kernel"], 1, 0), "bn3", p, st, ns)
            needs_shortcut = stride != 1 or x.shape[-1] != planes * expansion
            assert ("downsample_conv" in p) == needs_shortcut, name
            if needs_shortcut:
                x = bn(
                    _np_conv(x, p["downsample_conv"]["kernel"], stride, 0),
                    "downsample_bn",
                    p,
                    st,
                    ns,
                )
            x = relu(x + y)
    return x.mean(axis=(1, 2)), new_stats


def np_head(params, stats, feats, train):
    """Linear -> BN -> ReLU -> Linear -> L2 normalise -> prototypes, in float64."""
    new_stats = {"projection_bn": {}}
    h = feats @ params["projection_hidden"]["kernel"] + params["projection_hidden"]["bias"]
    h = np.maximum(
        _np_bn(
            h, params["projection_bn"], stats["projection_bn"], new_stats["projection_bn"], train
        ),
        0,
    )
    z = h @ params["projection_out"]["kernel"] + params["projection_out"]["bias"]
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    heads = sorted(k for k in params if k.startswith("prototypes_"))
    return z, [z @ params[k]["kernel"] for k in heads], new_stats


def _random_variables(model, *args, seed=0):
    """Variables of the model's init shapes filled with random values (no init compile).

    Kernels N(0, 2/fan_in) (conv) or N(0, 1/fan_in) (dense); BN scales and running
    variances U(0.5, 1.5); biases and running means N(0, 0.2): every parameter and
    statistic matters, so the references check how each is used.
    """
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), *args)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(s.shape[:-1])
            x = rng.normal(0, np.sqrt((2.0 if len(s.shape) == 4 else 1.0) / fan_in), s.shape)
        elif name in ("scale", "var"):
            x = rng.uniform(0.5, 1.5, s.shape)
        else:
            x = rng.normal(0, 0.2, s.shape)
        return jnp.asarray(x, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _assert_tree_close(actual, expected, rtol, atol):
    actual_flat = jax.tree_util.tree_flatten_with_path(actual)[0]
    expected_flat = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert len(actual_flat) == len(expected_flat)
    for path, a in actual_flat:
        np.testing.assert_allclose(
            np.asarray(a), expected_flat[path], rtol=rtol, atol=atol, err_msg=str(path)
        )


# ----------------------------------------------------------------------------------------
# Parameter counts (jax.eval_shape: nothing is computed).


def _reference_trunk_count(arch, width):
    """Conv weights + BN (gamma, beta) of a torchvision v1.5 ResNet without the fc."""
    stage_sizes, kind = LAYOUTS[arch]
    expansion = 1 if kind == "basic" else 4
    c = 64 * width
    total = 7 * 7 * 3 * c + 2 * c
    cin = c
    for s, n in enumerate(stage_sizes):
        planes = 64 * width * 2**s
        cout = planes * expansion
        for b in range(n):
            if kind == "basic":
                total += 9 * cin * planes + 2 * planes + 9 * planes * planes + 2 * planes
            else:
                total += cin * planes + 2 * planes + 9 * planes * planes + 2 * planes
                total += planes * cout + 2 * cout
            if b == 0 and (s > 0 or cin != cout):
                total += cin * cout + 2 * cout
            cin = cout
    return total


def _trunk_params(arch, width=1):
    model = resnet(arch, width=width)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    return _count(shapes["params"])


@pytest.mark.parametrize(
    "arch, expected",
    # torchvision's counts minus the 1000-way classifier (fc weight + bias).
    [
        ("resnet18", 11_689_512 - 513_000),
        ("resnet34", 21_797_672 - 513_000),
        ("resnet50", 25_557_032 - 2_049_000),
        ("resnet101", 44_549_160 - 2_049_000),
    ],
)
def test_trunk_param_counts_match_torchvision(arch, expected):
    assert _trunk_params(arch) == expected
    assert _reference_trunk_count(arch, 1) == expected  # the reference agrees too


@pytest.mark.parametrize("width, paper_millions", [(2, 94), (4, 375), (5, 586)])
def test_wide_resnet50_param_counts(width, paper_millions):
    n = _trunk_params("resnet50", width)
    print(f"resnet50w{width}: {n:,} trunk parameters")
    assert n == _reference_trunk_count("resnet50", width)
    assert abs(n / 1e6 - paper_millions) < 1.0  # the release reports 94M / 375M / 586M


def test_resnet_rejects_unknown_arch_and_bad_images():
    with pytest.raises(ValueError, match="arch"):
        resnet("resnet152")
    model = resnet("resnet18", base_width=2, small_stem=True)
    with pytest.raises(ValueError, match="images"):
        model.init(jax.random.key(0), jnp.zeros((8, 8, 3)), train=False)


# ----------------------------------------------------------------------------------------
# Full-size model: parameter paths, shapes and dtypes (traced only).


def test_resnet50_swav_paths_shapes_dtypes_bf16():
    model = SwAVModel(arch="resnet50", dtype=jnp.bfloat16)
    crops = [jnp.zeros((2, 2, 224, 224, 3)), jnp.zeros((6, 2, 96, 96, 3))]
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), crops, train=False))
    params = variables["params"]
    assert set(params) == {
        "backbone",
        "projection_hidden",
        "projection_bn",
        "projection_out",
        "prototypes_0",
    }
    assert _count(params["backbone"]) == 23_508_032
    assert params["projection_hidden"]["kernel"].shape == (2048, 2048)
    assert params["projection_out"]["kernel"].shape == (2048, 128)
    assert params["prototypes_0"]["kernel"].shape == (128, 3000)
    assert "bias" not in params["prototypes_0"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    (z, scores), new_vars = jax.eval_shape(
        lambda v: model.apply(v, crops, train=True, mutable=["batch_stats"]), variables
    )
    assert (z.shape, z.dtype) == ((8, 2, 128), jnp.float32)
    assert len(scores) == 1 and (scores[0].shape, scores[0].dtype) == ((8, 2, 3000), jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_vars))
    feats = jax.eval_shape(
        lambda v: model.apply(v, crops[0][0], method=SwAVModel.features), variables
    )
    assert (feats.shape, feats.dtype) == ((2, 2048), jnp.float32)


# ----------------------------------------------------------------------------------------
# Tiny models, real forwards.

TINY = dict(
    arch="resnet18",
    base_width=4,
    small_stem=True,
    hidden_dim=24,
    proj_dim=8,
    num_prototypes=(10, 6),
)


def _tiny_crops(seed, batch, sizes=(16, 8), counts=(2, 3)):
    rng = np.random.default_rng(seed)
    return [
        jnp.asarray(rng.normal(size=(n, batch, s, s, 3)), jnp.float32)
        for n, s in zip(counts, sizes)
    ]


@functools.lru_cache(maxsize=None)
def _tiny_variables():
    return _random_variables(SwAVModel(**TINY), _tiny_crops(0, 2), seed=1)


@pytest.mark.parametrize(
    "arch, base_width, small_stem, size, batch",
    [("resnet18", 4, True, 12, 4), ("resnet50", 2, False, 64, 8)],
)
def test_resnet_matches_numpy_reference(arch, base_width, small_stem, size, batch):
    """Train mode (batch statistics, updated running stats) and eval mode.

    Tolerance: a deep net whose BNs see few values per channel is ill-conditioned; here
    a 1e-7 relative change of the input moves the float64 reference's features by up to
    4e-5, so float32 agrees to a few times that. Layout mistakes (stride placement,
    padding, shortcut) change the features by O(0.1).
    """
    model = resnet(arch, base_width=base_width, small_stem=small_stem)
    x = np.random.default_rng(2).normal(size=(batch, size, size, 3)).astype(np.float32)
    variables = _random_variables(model, x, seed=4)
    p64, s64 = _to_np(variables["params"]), _to_np(variables["batch_stats"])
    x64 = x.astype(np.float64)

    feats, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    ref_feats, ref_stats = np_resnet(p64, s64, x64, arch, 1, base_width, small_stem, train=True)
    assert feats.shape == (batch, 8 * base_width * (4 if arch == "resnet50" else 1))
    assert feats.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(feats), ref_feats, rtol=1e-4, atol=5e-4)
    _assert_tree_close(updates["batch_stats"], ref_stats, rtol=2e-4, atol=2e-5)

    # Eval mode: running statistics, nothing updated.
    feats = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    ref_feats, _ = np_resnet(p64, s64, x64, arch, 1, base_width, small_stem, train=False)
    np.testing.assert_allclose(np.asarray(feats), ref_feats, rtol=1e-4, atol=5e-4)


def test_init_distributions():
    """Conv: untruncated N(0, 2/fan_out); Linear: PyTorch's U(+-1/sqrt(fan_in)); BN 1/0."""
    model = SwAVModel(
        arch="resnet18",
        base_width=16,
        small_stem=True,
        hidden_dim=256,
        proj_dim=128,
        num_prototypes=(3000,),
    )
    params = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(5), _tiny_crops(0, 2, (8,), (1,))
    )["params"]
    k = np.asarray(params["backbone"]["stage4_block1"]["conv2"]["kernel"])  # [3, 3, 128, 128]
    std = np.sqrt(2.0 / (9 * 128))
    assert abs(k.std() / std - 1) < 0.02 and abs(k.mean()) < 0.02 * std
    assert np.abs(k).max() > 3.5 * std  # a truncated normal would stop at 2 std
    for name, fan_in in [
        ("projection_hidden", 128),
        ("projection_out", 256),
        ("prototypes_0", 128),
    ]:
        for leaf in ("kernel", "bias"):
            if leaf not in params[name]:
                continue
            w = np.asarray(params[name][leaf])
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.98 * bound, (name, leaf)
            if w.size > 1000:  # uniform: std = bound / sqrt(3)
                assert abs(w.std() * np.sqrt(3) / bound - 1) < 0.03, (name, leaf)
    bn = params["backbone"]["stage2_block0"]["bn2"]
    assert np.all(np.asarray(bn["scale"]) == 1) and np.all(np.asarray(bn["bias"]) == 0)
    assert np.all(np.asarray(params["projection_bn"]["scale"]) == 1)


def test_head_matches_numpy_reference():
    model = SwAVModel(**TINY)
    variables = _tiny_variables()
    feats = np.random.default_rng(6).normal(size=(10, 32)).astype(np.float32)
    apply = jax.jit(
        functools.partial(model.apply, method=SwAVModel.head, mutable=["batch_stats"]),
        static_argnames="train",
    )
    (z, scores), updates = apply(variables, feats, train=True)
    p64, s64 = _to_np(variables["params"]), _to_np(variables["batch_stats"])
    ref_z, ref_scores, ref_stats = np_head(p64, s64, feats.astype(np.float64), train=True)
    np.testing.assert_allclose(np.asarray(z), ref_z, rtol=1e-4, atol=1e-5)
    assert len(scores) == 2
    for s, r in zip(scores, ref_scores):
        assert s.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(s), r, rtol=1e-4, atol=1e-5)
    _assert_tree_close(
        updates["batch_stats"]["projection_bn"], ref_stats["projection_bn"], rtol=1e-4, atol=1e-6
    )


def test_multicrop_forward_equals_groups_run_separately():
    """Backbone BN statistics per resolution group, running stats updated group by group,
    features concatenated crop-major (crop v of image b at row v * B + b), head run once."""
    model = SwAVModel(**TINY)
    variables = _tiny_variables()
    batch = 3
    crops = _tiny_crops(7, batch)
    (z, scores), updates = jax.jit(
        functools.partial(model.apply, train=True, mutable=["batch_stats"])
    )(variables, crops)
    assert z.shape == (5, batch, 8) and [s.shape for s in scores] == [(5, batch, 10), (5, batch, 6)]

    features = jax.jit(
        functools.partial(
            model.apply, method=SwAVModel.features, train=True, mutable=["batch_stats"]
        )
    )
    head = jax.jit(
        functools.partial(model.apply, method=SwAVModel.head, train=True, mutable=["batch_stats"])
    )
    stats = variables["batch_stats"]
    feats = []
    for group in crops:  # the release: torch.cat of this group's crops, one backbone call
        f, new = features(
            {"params": variables["params"], "batch_stats": stats}, jnp.concatenate(list(group))
        )
        stats = new["batch_stats"]
        feats.append(f)
    (ref_z, ref_scores), new = head(
        {"params": variables["params"], "batch_stats": stats}, jnp.concatenate(feats)
    )
    np.testing.assert_allclose(
        np.asarray(z).reshape(5 * batch, -1), np.asarray(ref_z), rtol=1e-5, atol=1e-6
    )
    for s, r in zip(scores, ref_scores):
        np.testing.assert_allclose(
            np.asarray(s).reshape(5 * batch, -1), np.asarray(r), rtol=1e-5, atol=1e-6
        )
    _assert_tree_close(updates["batch_stats"], _to_np(new["batch_stats"]), rtol=1e-5, atol=1e-6)

    # And the result really depends on the grouping: one BN batch over all crops would
    # need equal resolutions, so compare the stem statistics with the NumPy recurrence.
    p64 = _to_np(variables["params"])
    old = np.asarray(variables["batch_stats"]["backbone"]["stem_bn"]["mean"], np.float64)
    means = [
        _np_conv(
            np.asarray(g, np.float64).reshape((-1,) + g.shape[2:]),
            p64["backbone"]["stem_conv"]["kernel"],
            1,
            1,
        ).mean((0, 1, 2))
        for g in crops
    ]
    expected = (1 - MOMENTUM) * ((1 - MOMENTUM) * old + MOMENTUM * means[0]) + MOMENTUM * means[1]
    np.testing.assert_allclose(
        np.asarray(updates["batch_stats"]["backbone"]["stem_bn"]["mean"]),
        expected,
        rtol=1e-4,
        atol=1e-6,
    )


def test_features_eval_mode_uses_running_stats():
    """SwAVModel.features in eval mode: the frozen trunk with BN running statistics."""
    model = SwAVModel(**TINY)
    variables = _tiny_variables()
    images = _tiny_crops(12, 4, sizes=(12,), counts=(1,))[0][0]
    feats = jax.jit(functools.partial(model.apply, method=SwAVModel.features))(variables, images)
    ref, _ = np_resnet(
        _to_np(variables["params"]["backbone"]),
        _to_np(variables["batch_stats"]["backbone"]),
        np.asarray(images, np.float64),
        "resnet18",
        1,
        TINY["base_width"],
        True,
        train=False,
    )
    assert (feats.shape, feats.dtype) == ((4, 32), jnp.float32)
    np.testing.assert_allclose(np.asarray(feats), ref, rtol=1e-4, atol=1e-5)


def test_embeddings_unit_norm_and_scores_cosines_bf16_small_stem_32px():
    model = SwAVModel(**{**TINY, "dtype": jnp.bfloat16})
    variables = _tiny_variables()
    variables = {**variables, "params": normalize_prototypes(variables["params"])}
    crops = _tiny_crops(8, 2, sizes=(32, 16), counts=(2, 4))
    (z, scores), _ = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, crops
    )
    assert (z.shape, z.dtype) == ((6, 2, 8), jnp.float32)
    assert [(s.shape, s.dtype) for s in scores] == [
        ((6, 2, 10), jnp.float32),
        ((6, 2, 6), jnp.float32),
    ]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0, rtol=1e-5)
    for s, name in zip(scores, ("prototypes_0", "prototypes_1")):
        assert np.all(np.abs(np.asarray(s)) <= 1 + 1e-5)
        # Scores are float32 products of the float32 embeddings and prototypes.
        ref = np.asarray(z, np.float64) @ np.asarray(
            variables["params"][name]["kernel"], np.float64
        )
        np.testing.assert_allclose(np.asarray(s), ref, rtol=1e-5, atol=1e-6)


def test_real_forward_224_and_96_crops():
    model = SwAVModel(
        arch="resnet18", base_width=2, hidden_dim=16, proj_dim=8, num_prototypes=(12,)
    )
    crops = _tiny_crops(9, 1, sizes=(224, 96), counts=(2, 6))
    variables = _random_variables(model, crops)
    (z, (scores,)), _ = jax.jit(
        functools.partial(model.apply, train=True, mutable=["batch_stats"])
    )(variables, crops)
    assert (z.shape, z.dtype, scores.shape, scores.dtype) == (
        (8, 1, 8),
        jnp.float32,
        (8, 1, 12),
        jnp.float32,
    )
    assert np.all(np.isfinite(np.asarray(scores)))


def test_linear_head_without_hidden_layer():
    """hidden_dim=0: the release's `--hidden_mlp 0`, a single Linear(F, proj_dim)."""
    model = SwAVModel(arch="resnet18", hidden_dim=0, proj_dim=16, num_prototypes=(7,))
    crops = [jnp.zeros((1, 2, 32, 32, 3))]
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), crops, train=False))["params"]
    assert set(params) == {"backbone", "projection_out", "prototypes_0"}
    assert params["projection_out"]["kernel"].shape == (512, 16)


def test_crops_validation():
    model = SwAVModel(**TINY)
    variables = _tiny_variables()
    with pytest.raises(ValueError, match="crops must be a non-empty list"):
        model.apply(variables, jnp.zeros((2, 2, 8, 8, 3)), train=False)
    with pytest.raises(ValueError, match=r"crops\[1\] must have shape"):
        model.apply(variables, [jnp.zeros((2, 2, 8, 8, 3)), jnp.zeros((2, 8, 8, 3))], train=False)
    with pytest.raises(ValueError, match="share B"):
        model.apply(
            variables, [jnp.zeros((2, 2, 8, 8, 3)), jnp.zeros((2, 3, 4, 4, 3))], train=False
        )


# ----------------------------------------------------------------------------------------
# Prototypes normalisation.


def test_normalize_prototypes():
    params = _tiny_variables()["params"]
    out = normalize_prototypes(params)
    for name in ("prototypes_0", "prototypes_1"):
        k = np.asarray(params[name]["kernel"], np.float64)
        ref = k / np.sqrt((k**2).sum(axis=0, keepdims=True))  # each column is a prototype
        np.testing.assert_allclose(np.asarray(out[name]["kernel"]), ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            np.linalg.norm(np.asarray(out[name]["kernel"]), axis=0), 1.0, rtol=1e-6
        )
    for name in params:
        if not name.startswith(PROTOTYPES_PREFIX):
            assert out[name] is params[name]
    assert np.asarray(params["prototypes_0"]["kernel"]).std() < 0.5  # input left untouched
    with pytest.raises(ValueError, match="prototypes_"):
        normalize_prototypes({"params": params})


# ----------------------------------------------------------------------------------------
# Cross-device BatchNorm.


def _sharded_apply(model, mesh, batch_axes, variables, crops, stats_spec):
    """Train-mode forward inside jax.shard_map, batch sharded over batch_axes."""
    crop_spec = P(None, batch_axes)

    def body(v, cs):
        (z, scores), new = model.apply(v, cs, train=True, mutable=["batch_stats"])
        stats = new["batch_stats"]
        if stats_spec != P():  # per-group statistics: stack them along the group axis
            stats = jax.tree.map(lambda x: x[None], stats)
        return (z, scores), stats

    fn = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), [crop_spec] * len(crops)),
            out_specs=((crop_spec, (crop_spec,) * len(model.num_prototypes)), stats_spec),
        )
    )
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
    crops = [jax.device_put(c, NamedSharding(mesh, crop_spec)) for c in crops]
    return jax.device_get(jax.block_until_ready(fn(variables, crops)))


def _single_apply(model, variables, crops):
    return jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, crops
    )


def test_sharded_sync_bn_equals_single_device():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    variables = _tiny_variables()
    crops = _tiny_crops(10, 8)  # one image per device
    (z, scores), stats = _sharded_apply(
        SwAVModel(**TINY, bn_axis_name="data"), mesh, "data", variables, crops, P()
    )
    (ref_z, ref_scores), ref = _single_apply(SwAVModel(**TINY), variables, crops)
    np.testing.assert_allclose(np.asarray(z), np.asarray(ref_z), rtol=1e-4, atol=1e-5)
    for s, r in zip(scores, ref_scores):
        np.testing.assert_allclose(np.asarray(s), np.asarray(r), rtol=1e-4, atol=1e-5)
    _assert_tree_close(stats, _to_np(ref["batch_stats"]), rtol=1e-4, atol=1e-5)


def test_grouped_sync_bn_equals_per_group_single_device():
    """8 devices, BN groups of 4: a (2, 4) mesh ('data', 'bn'), BN over 'bn' only."""
    shape = sync_bn_mesh_shape(jax.device_count(), 4)
    assert shape == (2, 4)
    mesh = jax.make_mesh(shape, ("data", "bn"))
    variables = _tiny_variables()
    crops = _tiny_crops(11, 8)
    (z, scores), stats = _sharded_apply(
        SwAVModel(**TINY, bn_axis_name="bn"), mesh, ("data", "bn"), variables, crops, P("data")
    )
    for g in range(2):  # group g holds images 4g .. 4g+3
        group_crops = [c[:, 4 * g : 4 * g + 4] for c in crops]
        (ref_z, ref_scores), ref = _single_apply(SwAVModel(**TINY), variables, group_crops)
        np.testing.assert_allclose(
            np.asarray(z[:, 4 * g : 4 * g + 4]), np.asarray(ref_z), rtol=1e-4, atol=1e-5
        )
        for s, r in zip(scores, ref_scores):
            np.testing.assert_allclose(
                np.asarray(s[:, 4 * g : 4 * g + 4]), np.asarray(r), rtol=1e-4, atol=1e-5
            )
        _assert_tree_close(
            jax.tree.map(lambda x: x[g], stats), _to_np(ref["batch_stats"]), rtol=1e-4, atol=1e-5
        )


def _bn_statement(x, stats, axes):
    """torch.nn.BatchNorm's train-mode update, float64: running mean and var (unbiased,
    n = values per channel over `axes`), and the output (biased variance)."""
    x = np.asarray(x, np.float64)
    n = x.size // x.shape[-1]
    mean, var = x.mean(axes), x.var(axes)
    running = {
        "mean": (1 - MOMENTUM) * stats["mean"] + MOMENTUM * mean,
        "var": (1 - MOMENTUM) * stats["var"] + MOMENTUM * var * n / (n - 1),
    }
    return running, (x - mean) / np.sqrt(var + EPS)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("fast", [True, False])
def test_batch_norm_running_variance_is_unbiased(recompute, fast):
    """Train mode: output with the biased batch variance, running variance updated with
    the unbiased one, as PyTorch; also over a (2, 4) mesh with BN groups of 4 devices,
    where n is the group's total count."""
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=(16, 3, 2, 5))).astype(np.float32)
    stats = {"mean": rng.normal(size=5), "var": rng.uniform(0.5, 1.5, size=5)}
    variables = {
        "params": {"scale": np.ones(5, np.float32), "bias": np.zeros(5, np.float32)},
        "batch_stats": jax.tree.map(np.float32, stats),
    }

    def module(axis_name):
        return batch_norm(
            jnp.float32, axis_name, recompute=recompute, use_running_average=False, use_fast_variance=fast
        )

    y, new = module(None).apply(variables, x, mutable=["batch_stats"])
    want_stats, want_y = _bn_statement(x, stats, (0, 1, 2))
    _assert_tree_close(new["batch_stats"], want_stats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-4, atol=1e-4)
    assert not np.allclose(want_stats["var"], (1 - MOMENTUM) * stats["var"] + MOMENTUM * x.var((0, 1, 2)))

    mesh = jax.make_mesh((2, 4), ("data", "bn"))
    batch = P(("data", "bn"))

    def body(v, xs):
        out, updated = module("bn").apply(v, xs, mutable=["batch_stats"])
        return out, jax.tree.map(lambda a: a[None], updated["batch_stats"])

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), batch), out_specs=(batch, P("data"))))
    y, grouped = jax.device_get(fn(jax.device_put(variables, NamedSharding(mesh, P())),
                                   jax.device_put(x, NamedSharding(mesh, batch))))
    for g in range(2):  # group g holds rows 8g .. 8g + 7: n = 8 * 3 * 2 values per channel
        want_stats, want_y = _bn_statement(x[8 * g : 8 * g + 8], stats, (0, 1, 2))
        _assert_tree_close(jax.tree.map(lambda a: a[g], grouped), want_stats, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y[8 * g : 8 * g + 8], want_y, rtol=1e-4, atol=1e-4)


def test_recomputed_batch_norm_saves_only_its_input_and_statistics(capsys):
    """The rematerialised BatchNorm keeps, per layer, its bf16 input and two float32
    [C] sums for the backward pass (no float32 copy of the activation), with gradients
    bitwise equal to the plain layer's."""
    from jax.ad_checkpoint import print_saved_residuals

    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 16), jnp.bfloat16)
    grads = []
    for recompute in (False, True):
        bn = batch_norm(jnp.bfloat16, None, recompute=recompute, use_running_average=False)
        stats = bn.init(jax.random.key(1), x)["batch_stats"]

        def loss(params, x):
            y, _ = bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return jnp.sum(y.astype(jnp.float32) * jnp.arange(16.0))

        params = {"scale": jnp.linspace(0.5, 1.5, 16), "bias": jnp.zeros(16)}
        grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x))
    print_saved_residuals(loss, params, x)
    saved = capsys.readouterr().out
    assert "bf16[8,8,8,16]" in saved and "f32[8,8,8,16]" not in saved.replace("bf16[8,8,8,16]", "")
    jax.tree.map(np.testing.assert_array_equal, grads[0], grads[1])


def test_batch_norm_needs_two_values_per_channel():
    bn = batch_norm(jnp.float32, None, use_running_average=False)
    variables = bn.init(jax.random.key(0), jnp.zeros((1, 4)))  # initialisation updates nothing
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn.apply(variables, jnp.zeros((1, 4)), mutable=["batch_stats"])


def test_sync_bn_mesh_shape():
    assert sync_bn_mesh_shape(8, 0) == (1, 8)
    assert sync_bn_mesh_shape(64, 8) == (8, 8)
    assert sync_bn_mesh_shape(8, 8) == (1, 8)
    for bad in (3, 16, -2):
        with pytest.raises(ValueError, match="sync_bn_group_size"):
            sync_bn_mesh_shape(8, bad)


# ----------------------------------------------------------------------------------------
# Building from the config.


def test_build_model_from_base_config():
    cfg = base.get_config().model
    model = build_model(cfg, bn_axis_name="bn")
    assert (model.arch, model.width, model.small_stem) == ("resnet50", 1, False)
    assert (model.hidden_dim, model.proj_dim, model.num_prototypes) == (2048, 128, (3000,))
    assert model.dtype == jnp.bfloat16 and model.bn_axis_name == "bn" and model.base_width == 64

    wide = ml_collections.ConfigDict(
        {**cfg.to_dict(), "width": 2, "hidden_dim": 8192, "num_prototypes": (3000, 3000, 3000)}
    )
    model = build_model(wide)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), [jnp.zeros((1, 1, 32, 32, 3))], train=False)
    )["params"]
    assert shapes["projection_hidden"]["kernel"].shape == (4096, 8192)
    assert [shapes[f"prototypes_{h}"]["kernel"].shape for h in range(3)] == [(128, 3000)] * 3

    # Bad values are the trainer's config validation's to report, before any model is built.
    for key, value in [
        ("arch", "vit"),
        ("dtype", "float16"),
        ("width", 0),
        ("hidden_dim", -1),
        ("num_prototypes", ()),
    ]:
        config = base.get_config()
        config.model[key] = value
        with pytest.raises(ConfigError, match=f"model.{key}"):
            validate_config(config, num_devices=8, num_processes=1)
