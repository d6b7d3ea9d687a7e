"""The release's 800-epoch ImageNet recipe: 75.3% linear top-1 reported.

SwAV ResNet-50, 800 epochs, batch 4096, 2x224 + 6x96: 75.3% ImageNet linear top-1.

Release: scripts/swav_800ep_pretrain.sh. This is base.py unchanged.
"""

from swav_jax.configs import base


def get_config():
    return base.get_config()
