"""The release's 200-epoch ImageNet recipe: 73.9% linear top-1 reported.

SwAV ResNet-50, 200 epochs, batch 4096, 2x224 + 6x96: 73.9% ImageNet linear top-1.

Release: scripts/swav_200ep_pretrain.sh (as the 800-epoch recipe but for the epochs).
"""

from swav_jax.configs import base


def get_config():
    c = base.get_config()
    c.epochs = 200
    return c
