"""Flax models for SwAV: ResNet backbones, projection head, prototypes (SPEC §1, §6)."""

from swav_jax.models.resnet import ARCHS, ResNet, resnet
from swav_jax.models.swav import (
    PROTOTYPES_PREFIX,
    SwAVModel,
    build_model,
    normalize_prototypes,
)
from swav_jax.models.sync_bn import sync_bn_mesh_shape

__all__ = [
    "ARCHS",
    "PROTOTYPES_PREFIX",
    "ResNet",
    "SwAVModel",
    "build_model",
    "normalize_prototypes",
    "resnet",
    "sync_bn_mesh_shape",
]
