"""Optimiser tests against float64 NumPy re-statements of docs/ALGORITHM.md §7 (not of the code)."""

import math

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_config
from swav_jax.configs.base import get_config
from swav_jax.errors import ConfigError
from swav_jax.optim import (
    FreezeState,
    freeze_for,
    lr_schedule,
    make_optimizer,
    prototype_mask,
)
from swav_jax.train.validate import validate_config


def optim_config(**overrides):
    cfg = get_config().optim
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


# ---------------------------------------------------------------- LR schedule


def release_schedule(start_warmup, base_lr, final_lr, warmup_iters, total_iters):
    # main_swav.py: np.linspace warmup, then a cosine over range(T - W).
    warmup = np.linspace(start_warmup, base_lr, warmup_iters)
    cos_iters = total_iters - warmup_iters
    cosine = np.array(
        [
            final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / cos_iters))
            for t in np.arange(cos_iters)
        ]
    )
    return np.concatenate([warmup, cosine])


def schedule_values(schedule, n):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n)), np.float64)


def assert_lrs_close(got, ref):
    # float32 LRs: the cosine's 1 + cos(x) near x = pi loses ~1e-7 of base_lr.
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7 * np.max(ref))


def test_schedule_matches_release():
    cfg = optim_config(base_lr=4.8, final_lr=0.0048, start_warmup=0.3, warmup_epochs=2)
    schedule = lr_schedule(cfg, steps_per_epoch=5, epochs=6, batch_size=4096)
    ref = release_schedule(0.3, 4.8, 0.0048, warmup_iters=10, total_iters=30)
    got = schedule_values(schedule, 30)
    assert_lrs_close(got, ref)
    assert got[0] == np.float32(0.3)
    assert got[9] == np.float32(4.8)  # end of warmup: base_lr at index W - 1
    assert got[10] == np.float32(4.8)  # cosine starts at base_lr too (t = 0)
    np.testing.assert_allclose(got[20], 0.0048 + 0.5 * (4.8 - 0.0048), rtol=1e-6)  # midway
    np.testing.assert_allclose(got[29], ref[29], rtol=1e-6, atol=1e-7 * 4.8)  # last step
    assert got[29] > 0.0048
    # Past the run the last value is held.
    assert float(schedule(1000)) == pytest.approx(got[29], rel=1e-6)


def test_schedule_without_warmup_and_one_warmup_step():
    cfg = optim_config(base_lr=0.6, final_lr=0.0006, warmup_epochs=0)
    got = schedule_values(lr_schedule(cfg, steps_per_epoch=4, epochs=3, batch_size=256), 12)
    assert_lrs_close(got, release_schedule(0.3, 0.6, 0.0006, 0, 12))
    assert got[0] == np.float32(0.6)

    # np.linspace(a, b, 1) == [a]: a single warmup step is start_warmup.
    cfg = optim_config(base_lr=0.6, final_lr=0.0006, start_warmup=0.1, warmup_epochs=1)
    got = schedule_values(lr_schedule(cfg, steps_per_epoch=1, epochs=5, batch_size=256), 5)
    assert_lrs_close(got, release_schedule(0.1, 0.6, 0.0006, 1, 5))


def test_schedule_scales_with_batch():
    cfg = optim_config(
        base_lr=0.3, final_lr=0.0003, start_warmup=0.05, warmup_epochs=1,
        scale_lr_with_batch=True,
    )
    got = schedule_values(lr_schedule(cfg, steps_per_epoch=3, epochs=4, batch_size=1024), 12)
    ref = release_schedule(0.05, 0.3 * 4, 0.0003 * 4, 3, 12)
    assert_lrs_close(got, ref)
    # Off by default: the configured values are used as they are.
    cfg.scale_lr_with_batch = False
    got = schedule_values(lr_schedule(cfg, steps_per_epoch=3, epochs=4, batch_size=1024), 12)
    assert_lrs_close(got, release_schedule(0.05, 0.3, 0.0003, 3, 12))


# ---------------------------------------------------------------- validation

BAD_VALUES = [
    ("lars_mode", "adam"),
    ("base_lr", 0.0),
    ("base_lr", -1.0),
    ("base_lr", float("nan")),
    ("base_lr", "4.8"),
    ("final_lr", -0.1),
    ("start_warmup", -0.3),
    ("warmup_epochs", 1.5),
    ("warmup_epochs", -1),
    ("scale_lr_with_batch", 1),
    ("momentum", 1.0),
    ("momentum", -0.1),
    ("weight_decay", -1e-6),
    ("trust_coefficient", 0.0),
    ("lars_eps", -1.0),
]


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_bad_config_values_name_the_key(key, value):
    config = tiny_config.get_config()
    with config.unlocked():  # a new section: ConfigDict would refuse a value of another type
        config.optim = ml_collections.ConfigDict({**config.optim.to_dict(), key: value})
    with pytest.raises(ConfigError, match=f"optim.{key}"):
        validate_config(config, num_devices=1, num_processes=1)


def test_bad_arguments_name_themselves():
    cfg = optim_config()
    with pytest.raises(ValueError, match="warmup_epochs"):
        lr_schedule(cfg, steps_per_epoch=10, epochs=5, batch_size=256)  # warmup 10 > 5
    for kwargs in [
        dict(steps_per_epoch=0, epochs=20, batch_size=256),
        dict(steps_per_epoch=1, epochs=0, batch_size=256),
        dict(steps_per_epoch=1, epochs=20, batch_size=0),
    ]:
        with pytest.raises(ValueError, match="steps_per_epoch, epochs, batch_size >= 1"):
            lr_schedule(cfg, **kwargs)
    with pytest.raises(ValueError, match="num_steps"):
        make_optimizer(cfg, 0.1, freeze_mask=prototype_mask, freeze_steps=-1)
    cfg.lars_mode = "adam"
    with pytest.raises(ValueError, match="optim.lars_mode"):
        make_optimizer(cfg, 0.1, freeze_mask=prototype_mask, freeze_steps=0)


# ---------------------------------------------------------------- optimiser steps

SHAPES = {
    "conv": {"kernel": (3, 3, 2, 4)},
    "bn": {"scale": (4,), "bias": (4,)},
    "head": {"kernel": (4, 3), "bias": (3,)},
    "prototypes_0": {"kernel": (3, 5)},
    "still": {"kernel": (2, 2)},
}
LRS = np.array([0.3, 1.2, 2.0, 1.5, 0.9, 0.4, 0.05], np.float32)
NUM_STEPS = len(LRS)


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


def make_problem(seed=0):
    """Float32 params and a sequence of float32 gradients, as {'params': SHAPES}."""
    rng = np.random.default_rng(seed)
    def normal(scale):
        return jax.tree.map(
            lambda s: (scale * rng.normal(size=s)).astype(np.float32),
            SHAPES,
            is_leaf=lambda s: isinstance(s, tuple),
        )

    params = normal(1.0)
    params["head"]["bias"] = np.zeros(3, np.float32)  # zero-initialised: ||w|| = 0 at first
    grads = []
    for step in range(NUM_STEPS):
        g = normal(0.1)
        g["still"]["kernel"] = np.zeros((2, 2), np.float32)  # never gets a gradient
        if step == 2:
            g["bn"]["scale"] = np.zeros(4, np.float32)  # zero grad after momentum built up
        grads.append({"params": g})
    return {"params": params}, grads


def swav_step_ref(w, g, buf, lr, *, wd, trust, eps, momentum, skip=()):
    """docs/ALGORITHM.md §7, release semantics, float64. Dicts of leaves; buf[k] is None until first use.

    Leaves in `skip` have grad None: LARC and SGD leave them (and their buffer) alone.
    """
    update = {}
    for k in w:
        if k in skip:
            update[k] = np.zeros_like(w[k])
            continue
        gk = g[k].copy()
        w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(gk)
        if w_norm > 0 and g_norm > 0:
            gk = (gk + wd * w[k]) * trust * w_norm / (g_norm + wd * w_norm + eps)
        buf[k] = gk if buf[k] is None else momentum * buf[k] + gk
        update[k] = -lr * buf[k]
    return update


def optax_step_ref(w, g, buf, lr, *, wd, trust, eps, momentum):
    """optax.lars as documented, with 1-D leaves excluded from decay and trust ratio."""
    update = {}
    for k in w:
        u = g[k].copy()
        if w[k].ndim > 1:
            u = u + wd * w[k]
            w_norm, u_norm = np.linalg.norm(w[k]), np.linalg.norm(u)
            ratio = trust * w_norm / (u_norm + eps) if w_norm > 0 and u_norm > 0 else 1.0
            u = u * ratio
        u = -lr * u
        buf[k] = u if buf[k] is None else u + momentum * buf[k]
        update[k] = buf[k]
    return update


def run_and_compare(opt, ref_step, ref_kwargs, *, frozen_key=None, freeze_steps=0):
    """Steps `opt` (jitted) and the float64 reference side by side.

    Per step, updates are compared on the same params (the reference fed the params
    the JAX run holds); at the end, the params of an independent float64 run.
    """
    params, grads = make_problem()
    state = opt.init(params)
    update = jax.jit(opt.update)
    buf_shared = {k: None for k in flat(params)}
    w_ref = {k: v.astype(np.float64) for k, v in flat(params).items()}
    buf_ref = {k: None for k in w_ref}
    initial = flat(params)
    for step in range(NUM_STEPS):
        skip = (frozen_key,) if frozen_key is not None and step < freeze_steps else ()
        kw = ref_kwargs if frozen_key is None else dict(ref_kwargs, skip=skip)
        g64 = {k: v.astype(np.float64) for k, v in flat(grads[step]).items()}
        lr = float(LRS[step])

        w_shared = {k: v.astype(np.float64) for k, v in flat(params).items()}
        want = ref_step(w_shared, g64, buf_shared, lr, **kw)
        updates, state = update(grads[step], state, params)
        got = flat(updates)
        for k in want:
            scale = np.max(np.abs(want[k])) if np.any(want[k]) else 0.0
            np.testing.assert_allclose(
                got[k], want[k], rtol=1e-6, atol=1e-6 * scale, err_msg=f"{k} step {step}"
            )
        params = optax.apply_updates(params, updates)

        upd_ref = ref_step(w_ref, g64, buf_ref, lr, **kw)
        w_ref = {k: w_ref[k] + upd_ref[k] for k in w_ref}

        assert int(state.count) == step + 1
        if frozen_key is not None and step < freeze_steps:
            np.testing.assert_array_equal(flat(params)[frozen_key], initial[frozen_key])
    # float32 params carry rounding relative to the tensor's scale (LARS steps scale with ||w||).
    for k, v in flat(params).items():
        atol = 1e-6 * np.max(np.abs(w_ref[k]))
        np.testing.assert_allclose(v, w_ref[k], rtol=1e-6, atol=atol, err_msg=k)
    return params, state, initial


def table_schedule(count):
    return jnp.asarray(LRS)[count]


@pytest.mark.parametrize(
    "wd,trust,eps",
    [(1e-6, 0.001, 1e-8), (0.05, 0.2, 1e-3)],  # the release's values; large enough to show
)
def test_swav_mode_matches_spec(wd, trust, eps):
    cfg = optim_config(lars_mode="swav", weight_decay=wd, trust_coefficient=trust, lars_eps=eps)
    opt = make_optimizer(cfg, table_schedule, freeze_mask=prototype_mask, freeze_steps=0)
    params, _, initial = run_and_compare(
        opt, swav_step_ref, dict(wd=wd, trust=trust, eps=eps, momentum=0.9)
    )
    final = flat(params)
    # The zero-grad tensor never moves (no decay either); the zero-init bias does move.
    still = "['params']['still']['kernel']"
    np.testing.assert_array_equal(final[still], initial[still])
    assert np.all(final["['params']['head']['bias']"] != 0)


def test_swav_mode_first_step_of_zero_tensor_is_raw_sgd():
    # ||w|| = 0: no LARS and no decay, the update is -lr * g exactly.
    cfg = optim_config(lars_mode="swav", weight_decay=0.5, trust_coefficient=0.01)
    opt = make_optimizer(cfg, 0.7, freeze_mask=prototype_mask, freeze_steps=0)
    params = {"w": jnp.zeros(3), "v": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5]), "v": jnp.array([1.0, -2.0, 0.5])}
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.7 * np.array([1.0, -2.0, 0.5]), rtol=1e-7)
    g, v = np.array([1.0, -2.0, 0.5]), np.ones(3)
    ratio = 0.01 * np.sqrt(3) / (np.linalg.norm(g) + 0.5 * np.sqrt(3) + 1e-8)
    want_v = -0.7 * (g + 0.5 * v) * ratio
    np.testing.assert_allclose(updates["v"], want_v, rtol=1e-6)


def test_freezing_in_swav_mode_matches_release():
    wd, trust, eps = 0.05, 0.2, 1e-3
    cfg = optim_config(lars_mode="swav", weight_decay=wd, trust_coefficient=trust, lars_eps=eps)
    freeze_steps = 3
    opt = make_optimizer(
        cfg, table_schedule, freeze_mask=prototype_mask, freeze_steps=freeze_steps
    )
    key = "['params']['prototypes_0']['kernel']"
    params, state, initial = run_and_compare(
        opt,
        swav_step_ref,
        dict(wd=wd, trust=trust, eps=eps, momentum=0.9),
        frozen_key=key,
        freeze_steps=freeze_steps,
    )
    assert isinstance(state, FreezeState)
    assert not np.array_equal(flat(params)[key], initial[key])  # moves after the freeze


@pytest.mark.parametrize("mode", ["swav", "optax"])
def test_freezing_keeps_momentum_untouched_during_freeze(mode):
    cfg = optim_config(lars_mode=mode)
    opt = make_optimizer(cfg, 1.0, freeze_mask=prototype_mask, freeze_steps=2)
    params, grads = make_problem()
    state = opt.init(params)
    update = jax.jit(opt.update)
    key = "['params']['prototypes_0']['kernel']"
    for step in range(3):
        updates, state = update(grads[step], state, params)
        params = optax.apply_updates(params, updates)
        (trace,) = [flat(s.trace) for s in state.inner_state if isinstance(s, optax.TraceState)]
        if step < 2:
            assert not np.any(trace[key])
            assert not np.any(flat(updates)[key])
        else:
            assert np.any(trace[key])
        assert np.any(trace["['params']['conv']['kernel']"])


def test_optax_mode_excludes_1d_leaves():
    wd, trust, eps = 0.05, 0.2, 1e-3
    cfg = optim_config(lars_mode="optax", weight_decay=wd, trust_coefficient=trust, lars_eps=eps)
    opt = make_optimizer(cfg, table_schedule, freeze_mask=prototype_mask, freeze_steps=0)
    run_and_compare(opt, optax_step_ref, dict(wd=wd, trust=trust, eps=eps, momentum=0.9))

    # 1-D leaves take plain momentum SGD steps: the first update is -lr * g.
    params, grads = make_problem()
    updates, _ = opt.update(grads[0], opt.init(params), params)
    for leaf in ("['bn']['scale']", "['bn']['bias']", "['head']['bias']"):
        leaf = "['params']" + leaf
        np.testing.assert_allclose(flat(updates)[leaf], -LRS[0] * flat(grads[0])[leaf], rtol=1e-6)


def test_modes_differ():
    # The two modes are different algorithms on the same inputs (a check that the mode is read).
    params, grads = make_problem()
    out = {}
    for mode in ("swav", "optax"):
        cfg = optim_config(lars_mode=mode, weight_decay=0.05, trust_coefficient=0.2)
        opt = make_optimizer(cfg, 0.5, freeze_mask=prototype_mask, freeze_steps=0)
        out[mode] = flat(opt.update(grads[0], opt.init(params), params)[0])
    k = "['params']['conv']['kernel']"
    assert not np.allclose(out["swav"][k], out["optax"][k], rtol=1e-3)


# ---------------------------------------------------------------- freeze_for on its own


def test_freeze_for_wrapper():
    # lr depends on the step so that a frozen leaf's first update shows which step it sees.
    inner = optax.chain(
        optax.trace(decay=0.5), optax.scale_by_learning_rate(lambda c: 0.1 * (c + 1))
    )
    opt = freeze_for(inner, lambda tree: {"a": True, "b": False}, num_steps=2)
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = opt.init(params)
    update = jax.jit(opt.update)
    g = {"a": jnp.full(2, 2.0), "b": jnp.full(3, 2.0)}
    b_trace = 0.0
    a_trace = 0.0
    for step in range(5):
        updates, state = update(g, state, params)
        lr = 0.1 * (step + 1)
        b_trace = 2.0 + 0.5 * b_trace
        if step >= 2:
            # Starts fresh at step 2 (trace = g), with that step's lr 0.3, not lr(0) = 0.1.
            a_trace = 2.0 + 0.5 * a_trace
        np.testing.assert_allclose(updates["b"], -lr * b_trace, rtol=1e-6)
        np.testing.assert_allclose(updates["a"], -lr * a_trace, rtol=1e-6)
        np.testing.assert_allclose(state.inner_state[0].trace["a"], a_trace, rtol=1e-6)
        assert int(state.count) == step + 1
        assert state.count.dtype == jnp.int32


def test_freeze_for_zero_steps_is_the_inner_transformation():
    inner = optax.sgd(0.1, momentum=0.9)
    opt = freeze_for(inner, {"a": True}, num_steps=0)
    params, g = {"a": jnp.ones(2)}, {"a": jnp.array([1.0, -1.0])}
    s_opt, s_inner = opt.init(params), inner.init(params)
    for _ in range(3):
        u_opt, s_opt = opt.update(g, s_opt, params)
        u_inner, s_inner = inner.update(g, s_inner, params)
        np.testing.assert_array_equal(u_opt["a"], u_inner["a"])


def test_freeze_for_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        freeze_for(optax.sgd(0.1), {"a": True}, num_steps=-1)
    opt = freeze_for(optax.sgd(0.1), {"a": True, "b": False}, num_steps=1)
    params = {"a": jnp.ones(2)}
    with pytest.raises(ValueError, match="freeze mask"):
        opt.update(params, opt.init(params), params)


def test_prototype_mask():
    params = {
        "params": {
            "backbone": {"conv": {"kernel": np.ones((3, 3, 1, 2))}},
            "head": {"kernel": np.ones((2, 2)), "bias": np.ones(2)},
            "my_prototypes": {"kernel": np.ones((2, 2))},
            "prototypes_0": {"kernel": np.ones((2, 5))},
            "prototypes_1": {"kernel": np.ones((2, 7))},
        }
    }
    mask = prototype_mask(params)
    assert mask == {
        "params": {
            "backbone": {"conv": {"kernel": False}},
            "head": {"kernel": False, "bias": False},
            "my_prototypes": {"kernel": False},
            "prototypes_0": {"kernel": True},
            "prototypes_1": {"kernel": True},
        }
    }
