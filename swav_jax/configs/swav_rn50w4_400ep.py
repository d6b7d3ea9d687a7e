"""The release's wide ResNet-50 x4, queue 2560 from epoch 0: 77.9% linear top-1 reported.

SwAV ResNet-50 w4, 400 epochs, batch 2560, 2x224 + 4x96, queue 2560 from epoch 0: 77.9% top-1.

Release: scripts/swav_RN50w4_400ep_pretrain.sh (64 GPUs x 40, hidden MLP 8192, crop
scales 0.08-1 and 0.08-0.14).
"""

from swav_jax.configs import base


def get_config():
    c = base.get_config()
    c.epochs = 400
    c.batch_size = 2560
    c.model.width = 4
    c.model.hidden_dim = 8192
    c.crops.num_crops = (2, 4)
    c.crops.min_scale_crops = (0.08, 0.08)
    c.swav.queue_length = 2560
    c.swav.epoch_queue_starts = 0
    return c
