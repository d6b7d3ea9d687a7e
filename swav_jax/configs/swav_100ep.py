"""The release's 100-epoch ImageNet recipe: 72.1% linear top-1 reported.

SwAV ResNet-50, 100 epochs, batch 4096, 2x224 + 6x96: 72.1% ImageNet linear top-1.

Release: scripts/swav_100ep_pretrain.sh (as the 800-epoch recipe but for the epochs).
"""

from swav_jax.configs import base


def get_config():
    c = base.get_config()
    c.epochs = 100
    return c
