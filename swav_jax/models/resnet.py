"""ResNet backbones (torchvision "v1.5" layout) as Flax linen modules (docs/ALGORITHM.md §3).

Follows the SwAV release's `src/resnet50.py` (which is torchvision's ResNet with a
width multiplier):

- stride on the 3x3 conv of a bottleneck (v1.5), a 1x1 strided conv + BN shortcut when
  the shape changes;
- conv kernels kaiming-normal, fan_out, ReLU gain: N(0, 2 / (k*k*out_channels)), a plain
  (not truncated) normal; no conv biases;
- BatchNorm gamma 1, beta 0 everywhere. The release's `zero_init_residual` defaults to
  False and its `main_swav.py` does not set it, so the last BN of each residual branch
  is *not* zero-initialised here either;
- BatchNorm eps 1e-5, momentum 0.1 in PyTorch's convention (Flax momentum 0.9). Batch
  statistics are float32 whatever the compute dtype. Train mode normalises with the
  biased batch variance and updates the running variance with the unbiased one,
  v * n / (n - 1) with n the values reduced per channel over the whole BN group, as
  PyTorch (and its SyncBatchNorm) does: running statistics, hence eval-mode features
  and exported checkpoints, are the release's (`BatchNorm` below; flax's own
  `nn.BatchNorm` keeps the biased variance);
- the width multiplier `width` scales every layer's channels (stem, bottleneck inner
  width, outputs), as the release's resnet50w2/w4/w5 (after its "fix bug with wider
  models" commit): features are 2048 * width for ResNet-50/101, 512 * width for
  ResNet-18/34.

`small_stem` replaces the 7x7/2 conv + 3x3/2 max-pool stem by one 3x3/1 conv (the
CIFAR-style recipes for 32-96 px images).

Cross-device BatchNorm: `bn_axis_name` names the mapped axis (or tuple of axes) of an
enclosing `jax.shard_map` over which batch statistics are averaged. For groups of
devices, see `swav_jax.mesh`.

Parameter tree (flax names): `stem_conv`, `stem_bn`, then `stage{s}_block{b}`
(s = 1..4, b = 0..) each holding `conv1`, `bn1`, `conv2`, `bn2` (+ `conv3`, `bn3` for
bottlenecks) and, in the first block of a stage when the shape changes,
`downsample_conv`, `downsample_bn`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Kaiming-normal, mode fan_out, ReLU gain: std = sqrt(2 / fan_out), not truncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

BN_MOMENTUM = 0.9  # Flax convention: PyTorch momentum 0.1.
BN_EPSILON = 1e-5

ARCHS: dict[str, tuple[tuple[int, ...], str]] = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
    "resnet101": ((3, 4, 23, 3), "bottleneck"),
}

_EXPANSION = {"basic": 1, "bottleneck": 4}


def _save_batch_statistics(prim, *_, **__) -> bool:
    """Remat policy of `RecomputedBatchNorm`: keep the reductions (per-channel sums and
    their cross-device sums), recompute everything elementwise."""
    return prim.name in ("reduce_sum", "psum", "psum_invariant")


class BatchNorm(nn.Module):
    """BatchNorm over every axis but the last, with PyTorch's running statistics.

    Train mode normalises x [..., C] with the batch mean and the biased batch variance
    (float32, averaged over `axis_name` when given: the statistics of the whole BN group)
    and, unless initialising, updates the running statistics as torch.nn.BatchNorm does:
    mean <- m * mean + (1 - m) * batch_mean and var <- m * var + (1 - m) * batch_var *
    n / (n - 1), n the values per channel in the group (local rows x group size), m the
    Flax-convention momentum. Eval mode normalises with the running statistics. The
    variables are flax's: params 'scale' (1) and 'bias' (0), batch_stats 'mean' (0) and
    'var' (1), float32 [C], so checkpoints and conversions are unchanged.

    Attributes:
      use_running_average: eval mode (may instead be given at call time).
      momentum, epsilon: as flax's nn.BatchNorm.
      dtype: output dtype (statistics are float32).
      axis_name: mapped axis name(s) of an enclosing shard_map to average statistics over.
      use_fast_variance: E[x^2] - E[x]^2 in one pass (flax's default); False computes
        E[(x - E[x])^2], which keeps precision for inputs far from zero mean.
    """

    use_running_average: bool | None = None
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: str | tuple[str, ...] | None = None
    use_fast_variance: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean, var, count = self._batch_statistics(x.astype(jnp.float32))
            if not self.is_initializing():
                if count < 2:
                    raise ValueError(
                        f"BatchNorm in train mode needs more than one value per channel, got {count} "
                        f"(input shape {x.shape}): the unbiased running variance is undefined"
                    )
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var * (count / (count - 1))
        mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        y = (x.astype(jnp.float32) - mean) * mul + bias.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)

    def _batch_statistics(self, x: jax.Array) -> tuple[jax.Array, jax.Array, int]:
        """(mean [C], biased variance [C], n) of float32 x [..., C] over the BN group."""
        axes = tuple(range(x.ndim - 1))
        count = math.prod(x.shape[:-1])
        # Initialisation runs outside any shard_map: no axis to average over.
        axis_name = None if self.is_initializing() else self.axis_name
        if axis_name is not None:
            count *= jax.lax.axis_size(axis_name)

        def group_mean(*values):
            means = jnp.stack([v.mean(axes) for v in values])
            return means if axis_name is None else jax.lax.pmean(means, axis_name)

        if self.use_fast_variance:
            mean, mean_sq = group_mean(x, jnp.square(x))
            var = jnp.maximum(0.0, mean_sq - jnp.square(mean))  # rounding can make it negative
        else:
            mean = group_mean(x)[0]
            var = group_mean(jnp.square(x - mean))[0]
        return mean, var, count


# BatchNorm whose backward pass recomputes the normalisation from the layer's input and
# the saved per-channel statistics, as cuDNN's does. Plain `BatchNorm` leaves two
# float32 copies of its input as autodiff residuals (the input promoted for the
# statistics, and input - mean), 8 bytes per element for a bf16 activation of 2 bytes:
# for ResNet-50 with 2 x 224 + 6 x 96 crops at batch 64 that is 17.7 of the 27.4 GB of
# residuals (docs/BENCHMARKS.md). Same arithmetic, same variables.
RecomputedBatchNorm = nn.remat(BatchNorm, policy=_save_batch_statistics)


def batch_norm(
    dtype: Any, bn_axis_name: str | tuple[str, ...] | None, *, recompute: bool = False, **kwargs: Any
) -> nn.Module:
    """The BatchNorm used everywhere in the models: `BatchNorm` (PyTorch's running
    statistics), gamma 1, beta 0, float32 params/stats.

    `kwargs` go to `BatchNorm` (name, use_running_average, use_fast_variance). With `recompute`, a
    `RecomputedBatchNorm`; then `use_running_average` must be given here, not at call
    time (call arguments of a rematerialised module are traced).
    """
    module = RecomputedBatchNorm if recompute else BatchNorm
    return module(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=bn_axis_name,
        **kwargs,
    )


class ResidualBlock(nn.Module):
    """One basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1) residual block.

    Attributes:
      planes: inner width; the block outputs `planes * expansion` channels.
      strides: stride of the block (on the first 3x3 conv, torchvision v1.5).
      kind: 'basic' or 'bottleneck'.
    """

    planes: int
    strides: int
    kind: str
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_channels = self.planes * _EXPANSION[self.kind]
        s = (self.strides, self.strides)
        if self.kind == "basic":
            y = self.conv(self.planes, (3, 3), s, padding=((1, 1), (1, 1)), name="conv1")(x)
            y = nn.relu(self.norm(name="bn1")(y))
            y = self.conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
            y = self.norm(name="bn2")(y)
        else:
            y = self.conv(self.planes, (1, 1), name="conv1")(x)
            y = nn.relu(self.norm(name="bn1")(y))
            y = self.conv(self.planes, (3, 3), s, padding=((1, 1), (1, 1)), name="conv2")(y)
            y = nn.relu(self.norm(name="bn2")(y))
            y = self.conv(out_channels, (1, 1), name="conv3")(y)
            y = self.norm(name="bn3")(y)
        if self.strides != 1 or x.shape[-1] != out_channels:
            x = self.conv(out_channels, (1, 1), s, name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet trunk up to global average pooling (no classifier).

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: 'bottleneck' (ResNet-50/101) or 'basic' (ResNet-18/34).
      width: width multiplier (2, 4, 5 for the wide ResNet-50s).
      base_width: stem width before the multiplier (64 in every real model; tiny values
        keep tests cheap).
      small_stem: 3x3 stride-1 stem conv and no max-pool (32-96 px images).
      dtype: computation dtype (e.g. bfloat16); parameters and BN statistics are float32.
      param_dtype: parameter dtype.
      bn_axis_name: mapped axis name(s) over which BN batch statistics are averaged.
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    width: int = 1
    base_width: int = 64
    small_stem: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | tuple[str, ...] | None = None

    @property
    def num_features(self) -> int:
        """Size of the pooled feature vector: 8 * base_width * width * expansion."""
        return 8 * self.base_width * self.width * _EXPANSION[self.block]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Pooled features.

        Args:
          x: [N, H, W, C] float images (already normalised).
          train: BN uses (and updates, when `batch_stats` is mutable) batch statistics
            if True, running statistics if False.

        Returns:
          [N, num_features] float32 globally average-pooled features.
        """
        if self.block not in _EXPANSION:
            raise ValueError(f"block must be one of {sorted(_EXPANSION)}, got {self.block!r}")
        if self.width < 1 or self.base_width < 1:
            raise ValueError(
                f"width and base_width must be >= 1, got width={self.width}, "
                f"base_width={self.base_width}"
            )
        if x.ndim != 4:
            raise ValueError(f"images must have shape [N, H, W, C], got shape {x.shape}")
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
        )
        norm = functools.partial(
            batch_norm, self.dtype, self.bn_axis_name, recompute=True, use_running_average=not train
        )
        stem_width = self.base_width * self.width
        if self.small_stem:
            x = conv(stem_width, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
        else:
            x = conv(stem_width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
            # Padding of a max-pool is -inf, as PyTorch's.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, num_blocks in enumerate(self.stage_sizes):
            for b in range(num_blocks):
                x = ResidualBlock(
                    planes=stem_width * 2**s,
                    strides=2 if s > 0 and b == 0 else 1,
                    kind=self.block,
                    conv=conv,
                    norm=norm,
                    name=f"stage{s + 1}_block{b}",
                )(x)
        # Pool in float32: a bf16 mean over 49+ positions would lose precision.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def resnet(arch: str, **kwargs: Any) -> ResNet:
    """A `ResNet` by name: 'resnet18', 'resnet34', 'resnet50' or 'resnet101'.

    Keyword arguments are `ResNet` fields (width, base_width, small_stem, dtype, ...).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    stage_sizes, block = ARCHS[arch]
    return ResNet(stage_sizes=stage_sizes, block=block, **kwargs)


def build_backbone(model_config: Any, bn_axis_name: str | tuple[str, ...] | None = None) -> ResNet:
    """The trunk every method's network shares, from the config's `model` section (arch,
    width, base_width, small_stem, dtype)."""
    c = model_config
    return resnet(
        c.arch,
        width=int(c.width),
        base_width=int(c.base_width),
        small_stem=bool(c.small_stem),
        dtype=jnp.dtype(c.dtype),
        bn_axis_name=bn_axis_name,
    )
