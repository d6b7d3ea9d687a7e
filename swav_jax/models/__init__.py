"""Flax models for SwAV: ResNet backbones, projection head, prototypes (docs/ALGORITHM.md §3)."""

from swav_jax.models.resnet import ARCHS, ResNet, build_backbone, resnet
from swav_jax.models.swav import (
    PROTOTYPES_PREFIX,
    SwAVModel,
    build_model,
    normalize_prototypes,
)

__all__ = [
    "ARCHS",
    "PROTOTYPES_PREFIX",
    "ResNet",
    "build_backbone",
    "SwAVModel",
    "build_model",
    "normalize_prototypes",
    "resnet",
]
