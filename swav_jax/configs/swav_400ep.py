"""The release's 400-epoch ImageNet recipe: 74.6% linear top-1 reported.

SwAV ResNet-50, 400 epochs, batch 4096, 2x224 + 6x96: 74.6% ImageNet linear top-1.

Release: scripts/swav_400ep_pretrain.sh (as the 800-epoch recipe but for the epochs).
"""

from swav_jax.configs import base


def get_config():
    c = base.get_config()
    c.epochs = 400
    return c
