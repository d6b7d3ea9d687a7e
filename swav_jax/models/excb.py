"""ExCB student/teacher network: ResNet backbone, projection MLP, predictor, centroids (docs/ALGORITHM.md §8).

    crops (per resolution group) -> backbone per group -> pooled features, concatenated
    crop-major -> projection MLP h: [Linear(F, hidden) -> BN -> ReLU] x hidden_layers
    -> Linear(hidden, proj_dim) = p
      h path:          cos(p, c_k)        for the K centroids c_k, global crops only
      predictor path:  cos(g(p), sg(c_k)) for all crops, with the predictor
                       g = BN -> Linear(proj_dim, hidden) -> BN -> ReLU -> Linear(hidden, proj_dim)

Parameter paths (flax `params` collection; `batch_stats` has the same paths for BNs):

    params['backbone'][...]                           the ResNet trunk (see resnet.py)
    params['projection_hidden_{i}']['kernel' | 'bias'] [F or hidden, hidden], i < hidden_layers
    params['projection_bn_{i}']['scale' | 'bias']      [hidden]
    params['projection_out']['kernel' | 'bias']        [hidden or F, proj_dim]
    params['predictor_bn_in']['scale' | 'bias']        [proj_dim]
    params['predictor_hidden']['kernel' | 'bias']      [proj_dim, hidden]
    params['predictor_bn']['scale' | 'bias']           [hidden]
    params['predictor_out']['kernel' | 'bias']         [hidden, proj_dim]
    params['centroids']                                [proj_dim, K] float32

The backbone sits under 'backbone', as in every method's network: the evaluation code
(`swav_jax.eval.run.feature_fn`) reads only that subtree.

Centroids. Each centroid is a column of `params['centroids']`, L2-normalised inside the
forward (the release's `weight_norm` with the gain fixed to 1), so gradients reach the
stored vectors through the normalisation and weight decay acts on the stored vectors.
The h path is computed for the *global* views (the crops of the first resolution group)
only: the loss pairs no local crop with it (`swav_jax.balancing.excb_loss`). Gradients
reach the centroids only through it; the predictor path sees them through
`stop_gradient` (the release's `predictor_grads=False`). Initialised as random unit
vectors; the trainer then replaces them, as the release does, by spherical k-means
centroids of the teacher's projections (`swav_jax.methods.excb`,
`excb.init_samples`).

Layout as the release's (ManiadisG/ExCB, `MLPBottleneckClassifier` with
`predictor_activation: bn`): the projection MLP has 2 hidden layers of 2048 with BN and
ReLU, out 256, no BN on the output; the predictor (docs/ALGORITHM.md §8's "1 layer": one hidden
layer) is BN(256) -> Linear(256, 2048) -> BN -> ReLU -> Linear(2048, 256); every Linear
kernel truncated-normal std 0.02, biases 0. The predictor's input BN removes the batch
mean of p, so the predictor path (half the loss, and all of the local crops' share)
cannot move every projection the same way. (docs/EXCB_DEMO.md has single runs with one
Linear layer as the predictor instead.)

Precision: the backbone and the hidden layers compute in `dtype`; the output layers, the
predictor's input BN, the normalisations and the similarities compute in float32
(similarities at HIGHEST matmul precision): the teacher's are divided by 0.04 before the
softmax.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from swav_jax.models.resnet import ResNet, batch_norm, resnet
from swav_jax.models.swav import l2_normalize

CENTROIDS = "centroids"

# The release's Linear init (DINO's): truncated normal std 0.02 (at +-2 std), bias 0.
_dense_kernel_init = nn.initializers.truncated_normal(stddev=0.02)


def _unit_columns_init(key, shape, dtype=jnp.float32):
    """Random unit vectors as columns: directions uniform on the sphere."""
    return l2_normalize(jax.random.normal(key, shape, dtype), axis=0)


def _cosine(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """[N, D] x [D, K] -> [N, K] float32 cosine similarities (x normalised here)."""
    return jnp.dot(l2_normalize(x.astype(jnp.float32)), centroids, precision=jax.lax.Precision.HIGHEST)


class ExCBModel(nn.Module):
    """Backbone + projection MLP + predictor + centroids, with the multi-crop forward.

    Attributes:
      arch, width, small_stem, base_width: the ResNet backbone (as `SwAVModel`).
      hidden_dim: width of the projection MLP's and the predictor's hidden layers (2048).
      hidden_layers: hidden layers of the projection MLP (2 in the release); 0 makes it
        a single Linear(F, proj_dim).
      proj_dim: projection (bottleneck) size (256).
      num_clusters: K, the number of centroids (65,536 in the paper).
      dtype: computation dtype of backbone and hidden layers; params are float32.
      bn_axis_name: mapped axis name(s) over which every BN averages batch statistics.
    """

    arch: str = "resnet50"
    width: int = 1
    small_stem: bool = False
    base_width: int = 64
    hidden_dim: int = 2048
    hidden_layers: int = 2
    proj_dim: int = 256
    num_clusters: int = 65536
    dtype: Any = jnp.float32
    bn_axis_name: str | tuple[str, ...] | None = None

    def setup(self):
        if self.proj_dim < 1 or self.hidden_dim < 1 or self.hidden_layers < 0 or self.num_clusters < 1:
            raise ValueError(
                "proj_dim, hidden_dim and num_clusters must be >= 1 and hidden_layers >= 0, got "
                f"proj_dim={self.proj_dim}, hidden_dim={self.hidden_dim}, "
                f"hidden_layers={self.hidden_layers}, num_clusters={self.num_clusters}"
            )
        self.backbone: ResNet = resnet(
            self.arch,
            width=self.width,
            base_width=self.base_width,
            small_stem=self.small_stem,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
        )
        dense = lambda features, dtype: nn.Dense(  # noqa: E731
            features, dtype=dtype, param_dtype=jnp.float32, kernel_init=_dense_kernel_init
        )
        # List attributes: flax names them projection_hidden_0, projection_bn_0, ...
        self.projection_hidden = [dense(self.hidden_dim, self.dtype) for _ in range(self.hidden_layers)]
        self.projection_bn = [batch_norm(self.dtype, self.bn_axis_name) for _ in range(self.hidden_layers)]
        self.projection_out = dense(self.proj_dim, jnp.float32)
        # Two-pass variance: p can sit far from the origin with a small spread across the
        # batch (every projection pointing the same way), where flax's default
        # E[x^2] - E[x]^2 cancels catastrophically in float32.
        self.predictor_bn_in = batch_norm(jnp.float32, self.bn_axis_name, use_fast_variance=False)
        self.predictor_hidden = dense(self.hidden_dim, self.dtype)
        self.predictor_bn = batch_norm(self.dtype, self.bn_axis_name)
        self.predictor_out = dense(self.proj_dim, jnp.float32)
        self.centroids = self.param(CENTROIDS, _unit_columns_init, (self.proj_dim, self.num_clusters))

    def features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Pooled backbone features [N, F] float32 of normalised images [N, H, W, 3]."""
        return self.backbone(images, train)

    def _project(self, crops: Sequence[jax.Array], train: bool) -> jax.Array:
        """[V, B, proj_dim] float32 projections p of all crops (BN over all crops at once)."""
        if isinstance(crops, jax.Array) or not isinstance(crops, (list, tuple)) or not crops:
            raise ValueError(
                "crops must be a non-empty list with one [num_crops, B, H, W, C] array per "
                f"resolution group, got {type(crops).__name__}"
            )
        batch = crops[0].shape[1]
        for g, c in enumerate(crops):
            if c.ndim != 5 or c.shape[1] != batch:
                raise ValueError(
                    f"crops[{g}] must have shape [num_crops, {batch}, H, W, C], got shape {c.shape}"
                )
        x = jnp.concatenate(
            [self.backbone(c.reshape((c.shape[0] * batch,) + c.shape[2:]), train) for c in crops], axis=0
        )
        for hidden, bn in zip(self.projection_hidden, self.projection_bn):
            x = nn.relu(bn(hidden(x), use_running_average=not train))
        p = self.projection_out(x.astype(jnp.float32))
        return p.reshape(-1, batch, self.proj_dim)

    def projections(self, images: jax.Array, train: bool) -> jax.Array:
        """[N, proj_dim] float32 L2-normalised projections p of normalised images [N, H, W, 3]
        (what the centroids are compared with; k-means initialises them on these)."""
        return l2_normalize(self._project([images[None]], train)[0])

    def _unit_centroids(self) -> jax.Array:
        return l2_normalize(self.centroids, axis=0)

    def teacher_similarities(self, crops: Sequence[jax.Array], train: bool) -> jax.Array:
        """h-path similarities only (the teacher's forward, on the global crops).

        Args:
          crops: as `__call__`.
          train: BN uses batch statistics if True.

        Returns:
          [V, B, K] float32 cosine similarities to the centroids.
        """
        p = self._project(crops, train)
        v, b, d = p.shape
        return _cosine(p.reshape(v * b, d), self._unit_centroids()).reshape(v, b, -1)

    def _predict(self, p: jax.Array, train: bool) -> jax.Array:
        """[N, proj_dim] -> [N, proj_dim] float32: the predictor g on projections p."""
        x = self.predictor_bn_in(p, use_running_average=not train)
        x = nn.relu(self.predictor_bn(self.predictor_hidden(x), use_running_average=not train))
        return self.predictor_out(x.astype(jnp.float32))

    def __call__(self, crops: Sequence[jax.Array], train: bool) -> tuple[jax.Array, jax.Array]:
        """The student's multi-crop forward.

        Each resolution group runs through the backbone as one batch (BN statistics per
        group); pooled features of all V = sum_g num_crops_g crops go through the
        projection MLP, and the projections through the predictor, together.

        Args:
          crops: one array per resolution group, [num_crops_g, B, H_g, W_g, 3] float,
            normalised; the first group holds the G global crops.
          train: BN uses batch statistics (and updates running ones when `batch_stats`
            is mutable) if True.

        Returns:
          similarities: [G, B, K] float32, h path of the global crops (crops[0]); the
            centroids' only gradient.
          predictor_similarities: [V, B, K] float32, predictor path of all crops; no
            centroid gradient.
        """
        p = self._project(crops, train)
        v, b, d = p.shape
        num_global = crops[0].shape[0]
        flat = p.reshape(v * b, d)
        centroids = self._unit_centroids()
        similarities = _cosine(flat[: num_global * b], centroids).reshape(num_global, b, -1)
        predictor_similarities = _cosine(self._predict(flat, train), jax.lax.stop_gradient(centroids))
        return similarities, predictor_similarities.reshape(v, b, -1)


def build_excb_model(config: Any, bn_axis_name: str | tuple[str, ...] | None = None) -> ExCBModel:
    """An `ExCBModel` from the full config: the backbone from `config.model` (arch, width,
    base_width, small_stem, dtype), the head from `config.excb` (hidden_dim,
    hidden_layers, proj_dim, num_clusters).

    Args:
      config: the full config (swav_jax/configs/base.py).
      bn_axis_name: mapped axis name(s) for cross-device BN; None for single device.
    """
    m, e = config.model, config.excb
    return ExCBModel(
        arch=m.arch,
        width=int(m.width),
        small_stem=bool(m.small_stem),
        base_width=int(m.base_width),
        hidden_dim=int(e.hidden_dim),
        hidden_layers=int(e.hidden_layers),
        proj_dim=int(e.proj_dim),
        num_clusters=int(e.num_clusters),
        dtype=jnp.dtype(m.dtype),
        bn_axis_name=bn_axis_name,
    )
