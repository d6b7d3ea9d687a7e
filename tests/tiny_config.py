"""A tiny demo config for trainer tests: 16-px digits, a 4-channel ResNet-18, 12 prototypes."""

from swav_jax.configs import demo


def get_config():
    c = demo.get_config()
    c.batch_size = 16
    c.epochs = 1
    c.data.image_size = 16
    c.data.canvas_size = 16
    c.crops.size_crops = (16, 8)
    c.crops.num_crops = (2, 2)
    c.model.base_width = 4
    c.model.hidden_dim = 32
    c.model.proj_dim = 16
    c.model.num_prototypes = (12,)
    c.swav.freeze_prototypes_niters = 1
    # Pinned, not inherited from the demo: the sharded-vs-single tolerances are set for it.
    c.optim.base_lr = 1.5
    c.eval.knn_every_epochs = 0
    c.eval.knn_at_end = False
    c.eval.knn_random_init = False
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    return c
