"""Semi-supervised fine-tuning on 1% of the ImageNet labels, the SwAV paper's setting.

The release's eval_semisup.py as its README runs it (`--labels_perc "1" --lr 0.02
--lr_last_layer 5`, 8 GPUs x 32): the pretrained ResNet-50 and a new Linear(2048, 1000)
head fine-tuned together for 20 epochs, SGD momentum 0.9 without weight decay, LR 0.02 for
the trunk and 5.0 for the head, both x 0.2 after epochs 12 and 16, global batch 256,
BatchNorm in train mode over the whole batch, in float32; RandomResizedCrop(224) + flip for
training, resize 256 + centre crop 224 for validation; the best epoch's top-1 is reported.

Reported by the paper (SwAV, ResNet-50, 800 epochs of pretraining; not a run of ours):
53.9% top-1, 78.5% top-5 on the ImageNet validation set.

The release trains on the SimCLR subset list (`1percent.txt` of google-research/simclr,
imagenet_subsets/), one file name per line; pass it with `--subset-file` (image folder
data: `--config.data.source=folder --config.data.data_dir=/data/imagenet
--config.data.eval_split=val`). Without it a class-balanced 1% drawn with c.seed is used.

    swav-jax eval finetune --config swav_semisup_1pct --workdir DIR \\
        --checkpoint swav_rn50 --subset-file 1percent.txt --config.data.data_dir=...
"""

from swav_jax.configs import base


def get_config():
    c = base.get_config()
    c.model.dtype = "float32"  # the release fine-tunes in float32
    c.eval.finetune.labels_fraction = 0.01
    c.eval.finetune.epochs = 20
    c.eval.finetune.batch_size = 256
    c.eval.finetune.lr = 0.02
    c.eval.finetune.lr_head = 5.0
    c.eval.finetune.decay_epochs = (12, 16)
    c.eval.finetune.gamma = 0.2
    return c
