"""Every key the code reads, set to the release's 800-epoch ImageNet recipe (75.3% linear top-1 reported).

Recipes import this and override. SwAV, ResNet-50, 800 epochs, batch 4096.
Source: the authors' release (scripts/swav_800ep_pretrain.sh: 64 GPUs x 64, 2x224 + 6x96,
LARS, base_lr 4.8, apex sync-BN in groups of 8). Reported: 75.3% ImageNet linear top-1.
swav_800ep.py is this config unchanged.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "swav"  # swav | excb (online cluster balancing, docs/ALGORITHM.md §8) | deepclusterv2
    c.seed = 31
    c.batch_size = 4096  # global, over all devices and processes
    c.epochs = 800
    # CPU runs only: split each process's CPU into this many XLA devices, which the step
    # runs data-parallel over (XLA keeps more cores busy with several small programs than
    # with one: 1.38x the images/s of cifar_cpu on 2 cores). 0: jax's default (one). The CLI
    # sets it before jax starts; a GPU or TPU run does not use it.
    c.cpu_devices = 0

    # Data source (swav_jax/data/sources.py).
    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # tfds | folder | digits
    c.data.name = "imagenet2012"  # tfds name
    c.data.split = "train"
    c.data.data_dir = ""  # tfds data_dir, or the image folder's root
    c.data.eval_split = "validation"
    c.data.num_workers = 8  # grain worker processes per host (0: in-process)
    c.data.read_threads = 2  # threads per worker (0: none), each building one batch
    c.data.prefetch = 2  # batches kept on device ahead of the step
    c.data.image_size = 0  # digits only: upscale the 8x8 images to this size
    # Each pass over the data ends at its last whole global batch, the rest of it
    # dropped (the release's drop_last); False: passes follow one another, a batch may
    # straddle two, nothing is dropped. DeepCluster-v2 needs True.
    c.data.drop_remainder = False
    c.data.canvas_size = 512  # host decodes into C x C uint8 (larger images shrunk to fit); crops cut on device

    # Multi-crop (per resolution group), as the release's flags.
    c.crops = ml_collections.ConfigDict()
    c.crops.size_crops = (224, 96)
    c.crops.num_crops = (2, 6)
    c.crops.min_scale_crops = (0.14, 0.05)
    c.crops.max_scale_crops = (1.0, 0.14)

    # Device-side augmentation (docs/ALGORITHM.md §2).
    c.augment = ml_collections.ConfigDict()
    c.augment.color_jitter_strength = 1.0  # brightness/contrast/saturation 0.8*s, hue 0.2*s
    c.augment.color_jitter_prob = 0.8
    c.augment.grayscale_prob = 0.2
    c.augment.blur_prob = 0.5
    c.augment.blur_sigma = (0.1, 2.0)
    c.augment.blur_kernel_size = 23
    c.augment.mean = (0.485, 0.456, 0.406)
    c.augment.std = (0.228, 0.224, 0.225)

    # Model (swav_jax/models).
    c.model = ml_collections.ConfigDict()
    c.model.arch = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    c.model.width = 1  # width multiplier (2, 4, 5 for the wide ResNet-50s)
    c.model.base_width = 64  # stem width before the multiplier (64 in every real ResNet)
    c.model.small_stem = False  # 3x3 stride-1 stem, no max-pool (32-96 px data)
    c.model.hidden_dim = 2048
    c.model.proj_dim = 128
    c.model.num_prototypes = (3000,)
    c.model.sync_bn_group_size = 8  # 0: BN statistics over all devices; else groups of n
    c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32

    # SwAV (docs/ALGORITHM.md §4-§6).
    c.swav = ml_collections.ConfigDict()
    c.swav.crops_for_assign = (0, 1)
    c.swav.temperature = 0.1
    c.swav.epsilon = 0.05
    c.swav.sinkhorn_iterations = 3
    c.swav.queue_length = 0  # total over devices; 0 = no queue
    c.swav.epoch_queue_starts = 15
    c.swav.freeze_prototypes_niters = 313

    # ExCB (docs/ALGORITHM.md §8; method = "excb"). Its backbone comes from c.model (arch, width,
    # base_width, small_stem, dtype, sync_bn_group_size), its head from here. It trains
    # with plain SGD: c.optim.base_lr / final_lr / start_warmup / warmup_epochs /
    # scale_lr_with_batch give the LR, c.optim.momentum the momentum, c.optim.weight_decay
    # the decay of every weight matrix and conv kernel (biases and BN parameters get
    # none, as in the release); LARS keys are not read. Recipes: excb_*.py.
    c.excb = ml_collections.ConfigDict()
    c.excb.num_clusters = 65536  # K centroids
    c.excb.hidden_dim = 2048  # hidden width of the projection MLP and of the predictor
    c.excb.hidden_layers = 2  # projection MLP hidden layers (the release's mlp_hidden_layers)
    c.excb.proj_dim = 256  # projection / centroid dimension
    c.excb.teacher_temperature = 0.04
    c.excb.student_temperature = 0.1
    c.excb.teacher_momentum = 0.996  # EMA teacher; cosine schedule up to 1 at the end of training
    c.excb.tracker_momentum = 0.999  # cluster-size EMA m_s
    c.excb.centroid_weight_decay = 1e-3  # centroids only; cosine schedule down to ...
    c.excb.centroid_weight_decay_end = 1e-4  # ... this at the end of training
    # Centroids start as spherical k-means of the teacher's projections of this many training
    # images (the release's clustering_samples); 0: random unit vectors.
    c.excb.init_samples = 500000

    # DeepCluster-v2 (method = "deepclusterv2"; the SwAV paper's appendix, the release's
    # main_deepclusterv2.py). Its network is c.model's: one head of prototypes per entry of
    # c.model.num_prototypes (the release: 3 x 3000), set to the k-means centroids at the
    # start of every epoch and never trained; LARS and its schedule from c.optim. The
    # c.swav keys are not read. Recipes: deepclusterv2_*.
    c.deepclusterv2 = ml_collections.ConfigDict()
    c.deepclusterv2.crops_for_assign = (0, 1)  # views kept in the memory bank (first resolution group)
    c.deepclusterv2.temperature = 0.1  # of the cross-entropy against the pseudo-labels
    c.deepclusterv2.kmeans_iters = 10  # centroid updates per head and epoch

    # Optimisation (docs/ALGORITHM.md §7).
    c.optim = ml_collections.ConfigDict()
    c.optim.lars_mode = "swav"  # swav: the release's LARC over SGD | optax: optax.lars
    c.optim.base_lr = 4.8
    c.optim.final_lr = 0.0048
    c.optim.start_warmup = 0.3
    c.optim.warmup_epochs = 10
    c.optim.scale_lr_with_batch = False  # base_lr * batch_size / 256
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-6
    c.optim.trust_coefficient = 0.001
    c.optim.lars_eps = 1e-8

    # Evaluation of frozen features (docs/ALGORITHM.md §11; swav_jax/eval).
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256  # global
    c.eval.image_size = 0  # 0: the first crop resolution (resize size*256/224, centre crop)
    c.eval.feature_dtype = "float32"  # float16 halves host memory for ImageNet-size banks
    c.eval.knn_k = (20, 200)
    c.eval.knn_temperature = 0.07
    c.eval.knn_every_epochs = 0  # online kNN monitor during pretraining; 0: off
    c.eval.knn_at_end = False  # kNN of the final model (and of random init, below)
    c.eval.knn_random_init = False  # also report eval/knn_top1_random_init at the end
    # ... and eval/knn_top1_raw_pixels: the same kNN on mean-centred pixels of the evaluation
    # images (host memory N x S*S*3 float32: small data sets only).
    c.eval.knn_raw_pixels = False
    # Linear probe (the release's eval_linear.py): SGD momentum 0.9, cosine per epoch.
    c.eval.linear_epochs = 100
    c.eval.linear_batch_size = 256  # global
    c.eval.linear_lr = 0.3
    c.eval.linear_weight_decay = 1e-6
    # Probe and fine-tuning train on RandomResizedCrop(eval image size, this area scale) + flip
    # (torchvision's default scale, as the release).
    c.eval.crop_scale = (0.08, 1.0)
    # Semi-supervised fine-tuning (the release's eval_semisup.py; swav-jax eval finetune):
    # the whole network + a new linear head on a labelled subset, SGD momentum 0.9, no weight
    # decay, LRs times gamma at each decay epoch. Defaults: its 10% setting
    # (recipe swav_semisup_10pct; swav_semisup_1pct for 1%).
    c.eval.finetune = ml_collections.ConfigDict()
    c.eval.finetune.labels_fraction = 0.1  # class-balanced subset drawn with c.seed ...
    c.eval.finetune.subset_file = ""  # ... unless this lists the images (one file name per line)
    c.eval.finetune.epochs = 20
    c.eval.finetune.batch_size = 256  # global
    c.eval.finetune.lr = 0.01  # trunk
    c.eval.finetune.lr_head = 0.2
    c.eval.finetune.decay_epochs = (12, 16)
    c.eval.finetune.gamma = 0.2

    # Loop, logging, checkpoints.
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.collapse_warning_steps = 500  # warn when the loss sits at ln(K) (or returns above it) this long

    # Where metrics go besides WORKDIR/metrics.jsonl and TensorBoard (always written).
    c.logging = ml_collections.ConfigDict()
    c.logging.wandb_project = ""  # Weights & Biases project (pip install 'swav-jax[wandb]'); "": off
    return c
