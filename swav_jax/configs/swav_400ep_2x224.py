"""The release's recipe without multi-crop (2 x 224): 70.1% linear top-1 reported.

SwAV ResNet-50, 400 epochs, batch 4096, 2 x 224 without multi-crop: 70.1% top-1.

Release: scripts/swav_400ep_2x224_pretrain.sh (crop scale 0.08-1).
"""

from swav_jax.configs import base


def get_config():
    c = base.get_config()
    c.epochs = 400
    c.crops.size_crops = (224,)
    c.crops.num_crops = (2,)
    c.crops.min_scale_crops = (0.08,)
    c.crops.max_scale_crops = (1.0,)
    return c
