"""SwAV on CIFAR-100 (GPU): the cifar10 recipe (solo-learn's) on TFDS `cifar100`.

solo-learn reports 64.88% top-1 (88.78% top-5) linear evaluation for it (README of
github.com/vturrisi/solo-learn; their number, not a run of ours). Same settings as
CIFAR-10 but the data set and CIFAR-100's channel mean and std; the differences from
their trainer are listed in swav_jax/configs/cifar10.py.

    swav-jax train --config cifar100 --workdir DIR --config.data.data_dir=TFDS_DIR
"""

from swav_jax.configs import cifar10


def get_config():
    c = cifar10.get_config()
    c.data.name = "cifar100"
    c.augment.mean = (0.5071, 0.4865, 0.4409)
    c.augment.std = (0.2673, 0.2564, 0.2762)
    return c
