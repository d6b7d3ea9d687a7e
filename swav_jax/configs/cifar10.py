"""SwAV on CIFAR-10 (GPU): solo-learn's recipe, ResNet-18 with the small-image stem, 1,000 epochs.

Source: solo-learn (da Costa et al., JMLR 2022), github.com/vturrisi/solo-learn,
scripts/pretrain/cifar/swav.yaml with scripts/pretrain/cifar/augmentations/symmetric.yaml
(read at commit 9187ea3). Their README reports, for this recipe, 89.17% top-1 (99.68%
top-5) linear evaluation on CIFAR-10 (64.88 / 88.78% on CIFAR-100, swav_jax/configs/cifar100.py):
their numbers, not runs of ours.

Their settings, as here: ResNet-18, 3x3 stride-1 stem without max-pool; projector
512 -> 2048 (BN, ReLU) -> 128; K = 3,000 prototypes, temperature 0.1, Sinkhorn epsilon
0.05, 3 iterations; a queue of 3,840 embeddings from epoch 50; prototypes frozen for the
first 2 epochs (2 x 195 steps); batch 256 (one GPU, synchronised BN), 1,000 epochs,
LARS lr 0.6 (x batch / 256), weight decay 1e-6, momentum 0.9, 10 warm-up epochs from
3e-5, cosine to 0; 16-bit mixed precision; two 32 px crops, scale 0.08-1, colour jitter
0.8 / 0.8 / 0.8 / 0.2 with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 (sigma 0.1-2 px),
no solarisation, horizontal flips; CIFAR-10's channel mean and std.

Where this trainer differs from theirs:
  - LARS: theirs uses eta 0.02 with clip_lr (per tensor, the rate is
    min(eta * ||w|| / (||g|| + wd ||w||), lr)) and leaves biases and BN parameters out of
    the trust ratio and the decay (exclude_bias_n_norm). There is no clipped LARS here;
    `lars_mode = "optax"` excludes the 1-D parameters the same way but scales every
    other step by lr * eta * ||w|| / ||g + wd w|| (no clip). Expect to tune base_lr.
  - Prototypes: theirs are a weight-normalised linear layer; here (as in the authors'
    release) unit-norm vectors renormalised before every step.
  - Evaluation: their linear top-1 trains a classifier on augmented crops online;
    `swav-jax eval linear` is the release's schedule on cached centre-crop features.

    swav-jax train --config cifar10 --workdir DIR --config.data.data_dir=TFDS_DIR

Data: TFDS `cifar10` (50,000 train / 10,000 test images), prepared as ArrayRecord
(`tfds build cifar10 --file_format=array_record`).
"""

from swav_jax.configs import base

STEPS_PER_EPOCH = 50000 // 256


def get_config():
    c = base.get_config()
    c.seed = 0
    c.batch_size = 256
    c.epochs = 1000

    c.data.source = "tfds"
    c.data.name = "cifar10"
    c.data.split = "train"
    c.data.eval_split = "test"
    c.data.canvas_size = 32
    c.data.num_workers = 4

    c.crops.size_crops = (32,)
    c.crops.num_crops = (2,)
    c.crops.min_scale_crops = (0.08,)
    c.crops.max_scale_crops = (1.0,)

    c.augment.color_jitter_strength = 1.0  # brightness/contrast/saturation 0.8, hue 0.2
    c.augment.color_jitter_prob = 0.8
    c.augment.grayscale_prob = 0.2
    c.augment.blur_prob = 0.5
    c.augment.blur_sigma = (0.1, 2.0)
    c.augment.blur_kernel_size = 13  # +-3 sigma at sigma = 2 px
    c.augment.mean = (0.4914, 0.4822, 0.4465)
    c.augment.std = (0.2470, 0.2435, 0.2616)

    c.model.arch = "resnet18"
    c.model.small_stem = True
    c.model.hidden_dim = 2048
    c.model.proj_dim = 128
    c.model.num_prototypes = (3000,)
    c.model.sync_bn_group_size = 0
    c.model.dtype = "bfloat16"

    c.swav.temperature = 0.1
    c.swav.epsilon = 0.05
    c.swav.sinkhorn_iterations = 3
    c.swav.queue_length = 3840
    c.swav.epoch_queue_starts = 50
    c.swav.freeze_prototypes_niters = 2 * STEPS_PER_EPOCH

    c.optim.lars_mode = "optax"
    c.optim.base_lr = 0.6
    c.optim.final_lr = 0.0
    c.optim.start_warmup = 3e-5
    c.optim.warmup_epochs = 10
    c.optim.scale_lr_with_batch = True
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-6
    c.optim.trust_coefficient = 0.02

    c.eval.knn_k = (20, 200)
    c.eval.knn_every_epochs = 50
    c.eval.knn_at_end = True
    c.eval.knn_random_init = True
    c.eval.knn_raw_pixels = True
    c.eval.image_size = 0

    c.log_every_steps = 50
    c.checkpoint_every_steps = 5 * STEPS_PER_EPOCH
    return c
