"""The release's 800-epoch DeepCluster-v2 recipe: 75.2% linear top-1 reported.

DeepCluster-v2 ResNet-50, 800 epochs, batch 4096, 2x224 + 6x96.

Reported by the release's model zoo for this recipe: 75.2% ImageNet linear top-1 (the
authors' number, not reproduced here).

Release: scripts/deepclusterv2_800ep_pretrain.sh (main_deepclusterv2.py) on 64 GPUs x 64:
3 heads of 3,000 prototypes, crops_for_assign 0 1, temperature 0.1, 128-d embeddings
after a 2048-wide hidden layer, 10 k-means iterations per epoch, crop scales
(0.14, 1) / (0.05, 0.14), LARC (trust 0.001) over SGD momentum 0.9, weight decay 1e-6,
base LR 4.8 to 0.0048 (cosine) after 10 warm-up epochs from 0.3, prototypes frozen for
300,000 iterations (the whole run), apex sync-BN in groups of 8, seed 31. The release
trains in float32 (no mixed-precision option), hence model.dtype here.
"""

from swav_jax.configs import base


def get_config():
    c = base.get_config()
    c.method = "deepclusterv2"
    c.data.drop_remainder = True  # each epoch one pass, each sample in the memory bank once
    c.epochs = 800
    c.model.num_prototypes = (3000, 3000, 3000)
    c.model.dtype = "float32"
    c.deepclusterv2.crops_for_assign = (0, 1)
    c.deepclusterv2.temperature = 0.1
    c.deepclusterv2.kmeans_iters = 10
    return c
