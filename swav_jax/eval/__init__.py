"""Evaluation of frozen features (SPEC §8): extraction, weighted k-NN, linear probe.

features.extract_features       feature_fn + batches -> host features, labels
knn.knn_classify / knn_predict  weighted k-NN (DINO protocol), chunked on device
linear.train_linear_probe       linear head on cached features
linear.train_linear_probe_on_images   the paper protocol on a frozen feature_fn
plots.plot_metrics              metrics.jsonl -> PNGs and a summary page (imported from its module, so
                                that importing this package does not load matplotlib)
"""

from swav_jax.eval.features import extract_features
from swav_jax.eval.knn import knn_classify, knn_predict
from swav_jax.eval.linear import train_linear_probe, train_linear_probe_on_images

__all__ = [
    "extract_features",
    "knn_classify",
    "knn_predict",
    "train_linear_probe",
    "train_linear_probe_on_images",
]
