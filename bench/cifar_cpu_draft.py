"""The draft before `cifar_cpu`: ImageNet stem at width 32, batch 128, 45 epochs, one device.

`swav_jax/configs/cifar_cpu.py` with the network, batch, epochs and device count the
natural-image pilots used before the recipe existed. docs/NATURAL_IMAGES.md's earlier
sections (the draft's 3 seeds, the multi-crop comparison, the probes) are runs of this
config with overrides; it is kept so that their commands still run as written. It
measured, over 3 seeds (2026-12-07, 784-810 s each on the idle 2-core machine): weighted
20-NN top-1 35.2-36.7% against 25.4-30.9% at random init and 36.5% for mean-centred raw
pixels, a tie with the pixels that the recipe's small stem and twice the epochs broke.

    python bench/natural_images.py run --log runs.jsonl --name NAME --workdir /tmp/NAME -- \\
        --config bench/cifar_cpu_draft.py --config.data.data_dir=DIR [overrides]
"""

from swav_jax.configs import cifar_cpu


def get_config():
    c = cifar_cpu.get_config()
    c.batch_size = 128
    c.epochs = 45
    c.cpu_devices = 0
    c.model.small_stem = False
    c.model.base_width = 32
    return c
