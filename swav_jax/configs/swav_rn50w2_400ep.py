"""The release's wide ResNet-50 x2 (hidden MLP 8192): 77.3% linear top-1 reported.

SwAV ResNet-50 w2, 400 epochs, batch 4096, 2x224 + 4x96: 77.3% top-1.

Release: scripts/swav_RN50w2_400ep_pretrain.sh (128 GPUs x 32, hidden MLP 8192).
"""

from swav_jax.configs import base


def get_config():
    c = base.get_config()
    c.epochs = 400
    c.model.width = 2
    c.model.hidden_dim = 8192
    c.crops.num_crops = (2, 4)
    return c
