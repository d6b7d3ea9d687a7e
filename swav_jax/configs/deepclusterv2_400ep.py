"""The release's 400-epoch DeepCluster-v2 recipe (2x160 + 4x96): 74.3% linear top-1 reported.

DeepCluster-v2 ResNet-50, 400 epochs, batch 4096, 2x160 + 4x96.

Reported by the release's model zoo for this recipe: 74.3% ImageNet linear top-1 (the
authors' number, not reproduced here).

Release: scripts/deepclusterv2_400ep_pretrain.sh: as deepclusterv2_800ep but
400 epochs, global crops of 160 px, 4 local crops, global crop scale (0.08, 1).
"""

from swav_jax.configs import deepclusterv2_800ep


def get_config():
    c = deepclusterv2_800ep.get_config()
    c.epochs = 400
    c.crops.size_crops = (160, 96)
    c.crops.num_crops = (2, 4)
    c.crops.min_scale_crops = (0.08, 0.05)
    c.crops.max_scale_crops = (1.0, 0.14)
    return c
