"""The release's batch-256 recipe, queue 3840 from epoch 15: 72.7% linear top-1 reported.

SwAV ResNet-50, 200 epochs, batch 256 with a 3840 queue from epoch 15: 72.7% top-1.

Release: scripts/swav_200ep_bs256_pretrain.sh (4 GPUs x 64, base_lr 0.6, no warm-up,
prototypes frozen 5005 iterations, PyTorch SyncBatchNorm over all GPUs).
"""

from swav_jax.configs import base


def get_config():
    c = base.get_config()
    c.epochs = 200
    c.batch_size = 256
    c.swav.queue_length = 3840
    c.swav.epoch_queue_starts = 15
    c.swav.freeze_prototypes_niters = 5005
    c.optim.base_lr = 0.6
    c.optim.final_lr = 0.0006
    c.optim.warmup_epochs = 0
    c.optim.start_warmup = 0.0
    c.model.sync_bn_group_size = 0
    return c
