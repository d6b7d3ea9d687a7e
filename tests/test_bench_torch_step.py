"""The PyTorch baseline (bench/torch_train_step.py) computes the step swav_jax computes:
same Sinkhorn codes, loss and LARC update, and a backbone with the same parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import step_common
from swav_jax import losses, sinkhorn

torch = pytest.importorskip("torch")
from bench import torch_train_step as tts  # noqa: E402


def _scores(rng, views, batch, k):
    z = rng.normal(size=(views * batch, 8))
    c = rng.normal(size=(k, 8))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return (z @ c.T).astype(np.float32)


def test_torch_baseline_sinkhorn_and_loss_match_swav_jax():
    rng = np.random.default_rng(0)
    views, batch, k = 6, 16, 12
    flat = _scores(rng, views, batch, k)
    np.testing.assert_allclose(
        tts.sinkhorn(torch.from_numpy(flat[:batch])).numpy(),
        np.asarray(sinkhorn(jnp.asarray(flat[:batch]))), rtol=1e-4, atol=1e-7,
    )
    expected = losses.swav_loss(jnp.asarray(flat.reshape(views, batch, k)))
    got = tts.swav_loss(torch.from_numpy(flat), batch, views)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)


def test_torch_baseline_larc_matches_swav_jax_optimizer():
    from swav_jax.optim import scale_by_larc

    rng = np.random.default_rng(1)
    shapes = [(3, 4), (5,), (2, 2)]
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    params[2][:] = 0.0  # zero weight: raw gradient, no decay
    grads = [rng.normal(size=s).astype(np.float32) for s in shapes]
    tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    for t, g in zip(tensors, grads):
        t.grad = torch.from_numpy(g.copy())
    tts.larc_(tensors)
    larc = scale_by_larc(trust_coefficient=tts.TRUST, weight_decay=tts.WEIGHT_DECAY, eps=tts.LARC_EPS)
    expected, _ = larc.update([jnp.asarray(g) for g in grads], larc.init(None), [jnp.asarray(p) for p in params])
    for t, e in zip(tensors, expected):
        np.testing.assert_allclose(t.grad.numpy(), np.asarray(e), rtol=1e-6, atol=1e-12)


def test_torch_baseline_backbone_has_the_flax_backbone_parameters():
    from swav_jax.models import resnet

    for arch, small_stem in (("resnet50", False), ("resnet18", True)):
        trunk = tts.ResNetTrunk(arch, width=1, base_width=8, small_stem=small_stem)
        flax = resnet(arch, base_width=8, small_stem=small_stem)
        variables = jax.eval_shape(lambda x: flax.init(jax.random.key(0), x, train=False),
                                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
        flax_count = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
        assert sum(p.numel() for p in trunk.parameters()) == flax_count
        out = trunk(torch.zeros(2, 3, 32, 32))
        assert out.shape == (2, step_common.num_features(arch, 1, 8))
