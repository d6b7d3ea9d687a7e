"""SwAV model: ResNet backbone, projection head, prototypes, multi-crop forward (docs/ALGORITHM.md §3).

    crops (per resolution group) -> backbone per group -> pooled features, concatenated
    crop-major -> Linear(F, hidden) -> BN -> ReLU -> Linear(hidden, proj_dim)
    -> L2 normalise (z) -> prototypes (bias-free Linear(proj_dim, K_h), one per head)

Parameter paths (flax `params` collection; `batch_stats` has the same paths for BNs):

    params['backbone'][...]                        the ResNet trunk (see resnet.py)
    params['projection_hidden']['kernel']          [F, hidden_dim]   (absent if hidden_dim == 0)
    params['projection_hidden']['bias']            [hidden_dim]
    params['projection_bn']['scale' | 'bias']      [hidden_dim]      (absent if hidden_dim == 0)
    params['projection_out']['kernel']             [hidden_dim or F, proj_dim]
    params['projection_out']['bias']               [proj_dim]
    params['prototypes_{h}']['kernel']             [proj_dim, K_h] float32, h = 0, 1, ...

Each prototype is a *column* of a `prototypes_{h}` kernel (PyTorch's weight rows).
`normalize_prototypes` L2-normalises them; the train step applies it before every
forward (the model itself does not), and freezes parameters whose top-level name
starts with `PROTOTYPES_PREFIX`.

Initialisation of the Linear layers follows PyTorch's default `nn.Linear` init, which
the release keeps for the head and the prototypes: kernel and bias both
U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The head's BN is gamma 1, beta 0 and, like every
BN of the release (converted to SyncBatchNorm), synchronised over `bn_axis_name`.

Precision: the backbone and the head's hidden layer compute in `dtype` (bf16 for
speed). The last projection, the L2 normalisation and the prototypes compute in float32
(prototypes at HIGHEST matmul precision), so embeddings and scores are float32: Sinkhorn
computes exp(scores / 0.05), which magnifies any rounding of the scores 20-fold.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from swav_jax.models.resnet import ResNet, batch_norm, resnet

PROTOTYPES_PREFIX = "prototypes_"

# PyTorch's default nn.Linear kernel init, kaiming_uniform(a=sqrt(5)):
# U(-b, b) with b = sqrt(3 * (1/3) / fan_in) = 1 / sqrt(fan_in).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
    """PyTorch's default nn.Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(||x||, 1e-12) along `axis`, as torch.nn.functional.normalize."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def normalize_prototypes(params: Any) -> Any:
    """L2-normalise every prototype: each column of each `prototypes_{h}` kernel.

    Pure: returns a new params tree; every other leaf is returned unchanged. The release
    overwrites the weights with their normalised copy under no_grad before each forward,
    so apply this to the params *outside* the differentiated function (gradients are
    taken with respect to the normalised prototypes, not through the normalisation).

    Args:
      params: the model's `params` collection (a dict with `prototypes_{h}` entries
        holding `kernel`: [proj_dim, K_h]).
    """
    heads = [name for name in params if name.startswith(PROTOTYPES_PREFIX)]
    if not heads:
        raise ValueError(
            f"params has no '{PROTOTYPES_PREFIX}*' entries; pass the model's params "
            f"collection (variables['params']), got keys {sorted(params)}"
        )
    out = dict(params)
    for name in heads:
        out[name] = {**params[name], "kernel": l2_normalize(params[name]["kernel"], axis=0)}
    return out


class SwAVModel(nn.Module):
    """Backbone + projection head + prototypes, with the multi-crop forward.

    Attributes:
      arch: 'resnet18' | 'resnet34' | 'resnet50' | 'resnet101'.
      width: width multiplier of the backbone.
      small_stem: 3x3 stride-1 stem without max-pool (32-96 px images).
      hidden_dim: hidden width of the projection head; 0 makes the head a single
        Linear(F, proj_dim) (the release's `--hidden_mlp 0`).
      proj_dim: embedding size (128).
      num_prototypes: K of each prototype head.
      base_width: backbone stem width before the multiplier (64; small for tests).
      dtype: computation dtype of backbone and hidden head layer; params are float32.
      bn_axis_name: mapped axis name(s) over which every BN averages batch statistics.
    """

    arch: str = "resnet50"
    width: int = 1
    small_stem: bool = False
    hidden_dim: int = 2048
    proj_dim: int = 128
    num_prototypes: tuple[int, ...] = (3000,)
    base_width: int = 64
    dtype: Any = jnp.float32
    bn_axis_name: str | tuple[str, ...] | None = None

    def setup(self):
        if self.proj_dim < 1 or self.hidden_dim < 0:
            raise ValueError(
                f"proj_dim must be >= 1 and hidden_dim >= 0, got proj_dim={self.proj_dim}, "
                f"hidden_dim={self.hidden_dim}"
            )
        if not self.num_prototypes or any(k < 1 for k in self.num_prototypes):
            raise ValueError(
                f"num_prototypes must be a non-empty tuple of positive ints, "
                f"got {self.num_prototypes}"
            )
        self.backbone: ResNet = resnet(
            self.arch,
            width=self.width,
            base_width=self.base_width,
            small_stem=self.small_stem,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
        )
        fan_in = self.backbone.num_features
        if self.hidden_dim > 0:
            self.projection_hidden = nn.Dense(
                self.hidden_dim,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=torch_linear_kernel_init,
                bias_init=torch_linear_bias_init(fan_in),
            )
            self.projection_bn = batch_norm(self.dtype, self.bn_axis_name)
            fan_in = self.hidden_dim
        self.projection_out = nn.Dense(
            self.proj_dim,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=torch_linear_kernel_init,
            bias_init=torch_linear_bias_init(fan_in),
        )
        # A list attribute: flax names the submodules prototypes_0, prototypes_1, ...
        self.prototypes = [
            nn.Dense(
                k,
                use_bias=False,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                precision=jax.lax.Precision.HIGHEST,
                kernel_init=torch_linear_kernel_init,
            )
            for k in self.num_prototypes
        ]

    def features(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Pooled backbone features, for evaluation (eval-mode BN by default).

        Args:
          images: [N, H, W, 3] float, normalised.
          train: use batch statistics in BN (then `batch_stats` must be mutable).

        Returns:
          [N, F] float32, F = 2048 * width (512 * width for resnet18/34).
        """
        return self.backbone(images, train)

    def head(self, features: jax.Array, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Projection head and prototypes on pooled features.

        Args:
          features: [N, F] pooled backbone features.
          train: BN of the head uses batch statistics if True.

        Returns:
          (z [N, proj_dim] float32 L2-normalised, scores: tuple of [N, K_h] float32).
        """
        x = features
        if self.hidden_dim > 0:
            x = self.projection_hidden(x)
            x = self.projection_bn(x, use_running_average=not train)
            x = nn.relu(x)
        z = l2_normalize(self.projection_out(x.astype(jnp.float32)))
        return z, tuple(p(z) for p in self.prototypes)

    def __call__(
        self, crops: Sequence[jax.Array], train: bool
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Multi-crop forward.

        Each resolution group runs through the backbone as one batch (BN statistics per
        group, as the release); pooled features are concatenated crop-major and the head
        runs once on all V = sum_g num_crops_g crops.

        Args:
          crops: one array per resolution group, [num_crops_g, B, H_g, W_g, 3] float,
            normalised, in the config's order (the assigning full-size crops first).
          train: BN uses batch statistics (and updates running ones when `batch_stats`
            is mutable) if True.

        Returns:
          embeddings: [V, B, proj_dim] float32, unit L2 norm.
          scores: tuple over prototype heads of [V, B, K_h] float32.
        """
        if isinstance(crops, jax.Array) or not isinstance(crops, (list, tuple)) or not crops:
            raise ValueError(
                "crops must be a non-empty list with one [num_crops, B, H, W, C] array per "
                f"resolution group, got {type(crops).__name__}"
            )
        for g, c in enumerate(crops):
            if c.ndim != 5:
                raise ValueError(
                    f"crops[{g}] must have shape [num_crops, B, H, W, C], got shape {c.shape}"
                )
        batch, channels = crops[0].shape[1], crops[0].shape[4]
        for g, c in enumerate(crops):
            if c.shape[1] != batch or c.shape[4] != channels:
                raise ValueError(
                    f"every crop group must share B and C: crops[0] has shape "
                    f"{crops[0].shape}, crops[{g}] has shape {c.shape}"
                )
        feats = [
            self.backbone(c.reshape((c.shape[0] * batch,) + c.shape[2:]), train) for c in crops
        ]
        z, scores = self.head(jnp.concatenate(feats, axis=0), train)
        num_views = z.shape[0] // batch
        return (
            z.reshape(num_views, batch, -1),
            tuple(s.reshape(num_views, batch, -1) for s in scores),
        )


def build_model(model_config: Any, bn_axis_name: str | tuple[str, ...] | None = None) -> SwAVModel:
    """A `SwAVModel` from the config's `model` ConfigDict (swav_jax/configs/base.py).

    Reads arch, width, base_width, small_stem, hidden_dim, proj_dim, num_prototypes and
    dtype (validated by the trainer). `sync_bn_group_size` is the trainer's business: it
    shapes the mesh (`swav_jax.mesh`) and picks `bn_axis_name`.

    Args:
      model_config: `config.model`.
      bn_axis_name: mapped axis name(s) for cross-device BN; None for single device.
    """
    c = model_config
    num_prototypes = (c.num_prototypes,) if isinstance(c.num_prototypes, int) else c.num_prototypes
    return SwAVModel(
        arch=c.arch,
        width=int(c.width),
        small_stem=bool(c.small_stem),
        hidden_dim=int(c.hidden_dim),
        proj_dim=int(c.proj_dim),
        num_prototypes=tuple(int(k) for k in num_prototypes),
        base_width=int(c.base_width),
        dtype=jnp.dtype(c.dtype),
        bn_axis_name=bn_axis_name,
    )
