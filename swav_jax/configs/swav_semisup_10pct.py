"""Semi-supervised fine-tuning on 10% of the ImageNet labels, the SwAV paper's setting.

The release's eval_semisup.py as its README runs it (`--labels_perc "10" --lr 0.01
--lr_last_layer 0.2`, 8 GPUs x 32): the pretrained ResNet-50 and a new Linear(2048, 1000)
head fine-tuned together for 20 epochs, SGD momentum 0.9 without weight decay, LR 0.01 for
the trunk and 0.2 for the head, both x 0.2 after epochs 12 and 16, global batch 256,
BatchNorm in train mode over the whole batch, in float32; RandomResizedCrop(224) + flip for
training, resize 256 + centre crop 224 for validation; the best epoch's top-1 is reported.

Reported by the paper (SwAV, ResNet-50, 800 epochs of pretraining; not a run of ours):
70.2% top-1, 89.9% top-5 on the ImageNet validation set.

The release trains on the SimCLR subset list (`10percent.txt` of google-research/simclr,
imagenet_subsets/), one file name per line; pass it with `--subset-file` (image folder
data: `--config.data.source=folder --config.data.data_dir=/data/imagenet
--config.data.eval_split=val`). Without it a class-balanced 10% drawn with c.seed is used.

    swav-jax eval finetune --config swav_semisup_10pct --workdir DIR \\
        --checkpoint swav_rn50 --subset-file 10percent.txt --config.data.data_dir=...
"""

from swav_jax.configs import swav_semisup_1pct


def get_config():
    c = swav_semisup_1pct.get_config()  # the same protocol; the labels and LRs differ
    c.eval.finetune.labels_fraction = 0.1
    c.eval.finetune.lr = 0.01
    c.eval.finetune.lr_head = 0.2
    return c
