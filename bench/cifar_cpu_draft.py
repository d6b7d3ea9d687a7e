"""The base of the CPU natural-image pilots in docs/NATURAL_IMAGES.md (not a recipe yet).

SwAV on a folder of 32 px photos (`--config.data.data_dir=DIR` with DIR/train/<class>/
and DIR/test/<class>/) within 15 minutes of a 2-core CPU, the target of a `cifar_cpu`
recipe: its learned 20-NN on the held-out images must beat mean-centred raw pixels and
its own random init. None of the pilots has (docs/NATURAL_IMAGES.md), so this lives in
bench/ as the pilots' starting point, not among the recipes:

    python bench/natural_images.py run --log runs.jsonl --name NAME --workdir /tmp/NAME -- \
        --config bench/cifar_cpu_draft.py --config.data.data_dir=DIR [overrides]
"""

from swav_jax.configs import base


def get_config():
    c = base.get_config()
    c.seed = 0
    c.batch_size = 128
    c.epochs = 20

    c.data.source = "folder"
    c.data.split = "train"
    c.data.eval_split = "test"
    c.data.canvas_size = 32
    c.data.num_workers = 0
    c.data.prefetch = 2

    c.crops.size_crops = (32, 16)
    c.crops.num_crops = (2, 4)
    c.crops.min_scale_crops = (0.2, 0.08)
    c.crops.max_scale_crops = (1.0, 0.3)
    c.augment.color_jitter_strength = 1.0
    c.augment.grayscale_prob = 0.2
    c.augment.blur_prob = 0.0
    c.augment.blur_kernel_size = 3

    c.model.arch = "resnet18"
    c.model.base_width = 32
    c.model.small_stem = False
    c.model.hidden_dim = 512
    c.model.proj_dim = 128
    c.model.num_prototypes = (32,)
    c.model.sync_bn_group_size = 0
    c.model.dtype = "float32"

    c.swav.epsilon = 0.03
    c.swav.queue_length = 0
    c.swav.freeze_prototypes_niters = 20

    c.optim.base_lr = 1.2
    c.optim.final_lr = 0.0003
    c.optim.start_warmup = 0.0
    c.optim.warmup_epochs = 1

    c.eval.knn_k = (20,)
    c.eval.knn_every_epochs = 0
    c.eval.knn_at_end = True
    c.eval.knn_random_init = True
    c.eval.knn_raw_pixels = True

    c.log_every_steps = 20
    c.checkpoint_every_steps = 100000
    c.keep_checkpoints = 1
    c.collapse_warning_steps = 200
    return c
