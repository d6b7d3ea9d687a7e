"""The release's 400-epoch DeepCluster-v2 recipe without multi-crop: 70.2% linear top-1 reported.

DeepCluster-v2 ResNet-50, 400 epochs, batch 4096, 2 x 224 without multi-crop.

Reported by the release's model zoo for this recipe: 70.2% ImageNet linear top-1 (the
authors' number, not reproduced here).

Release: scripts/deepclusterv2_400ep_2x224_pretrain.sh: as deepclusterv2_800ep
but 400 epochs and two 224 px crops of scale (0.08, 1).
"""

from swav_jax.configs import deepclusterv2_800ep


def get_config():
    c = deepclusterv2_800ep.get_config()
    c.epochs = 400
    c.crops.size_crops = (224,)
    c.crops.num_crops = (2,)
    c.crops.min_scale_crops = (0.08,)
    c.crops.max_scale_crops = (1.0,)
    return c
