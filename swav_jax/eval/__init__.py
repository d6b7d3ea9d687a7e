"""Evaluation (docs/ALGORITHM.md section 11): frozen features, weighted k-NN, the linear
probe, semi-supervised fine-tuning.

features.extract_features       feature_fn + batches -> host features, labels
knn.knn_classify / knn_predict  weighted k-NN (DINO protocol), chunked on device
linear.train_linear_probe       linear head on cached features
images.train_classifier         the release's protocols on augmented images: a linear
                                probe of the frozen trunk, or fine-tuning the whole network
                                (the classifiers: run.probe_classifier, run.finetune_classifier)
subsets.balanced_subset         labelled subsets for fine-tuning
plots.plot_metrics              metrics.jsonl -> PNGs and a summary page (imported from its module, so
                                that importing this package does not load matplotlib)
"""

from swav_jax.eval.features import extract_features
from swav_jax.eval.images import train_classifier
from swav_jax.eval.knn import knn_classify, knn_predict
from swav_jax.eval.linear import train_linear_probe
from swav_jax.eval.subsets import balanced_subset

__all__ = [
    "balanced_subset",
    "extract_features",
    "knn_classify",
    "knn_predict",
    "train_classifier",
    "train_linear_probe",
]
