"""swav-jax: SwAV self-supervised pretraining in JAX/Flax.

The top level holds only the pure-jax algorithms (Sinkhorn codes, the SwAV loss, ExCB
cluster balancing, DeepCluster-v2's distributed k-means, memory bank and loss), so
importing it costs nothing beyond jax. Models, data, training and evaluation live
in the subpackages `swav_jax.models`, `swav_jax.data`, `swav_jax.train`,
`swav_jax.eval` and are imported explicitly.
"""

from swav_jax.balancing import (
    balance_similarities,
    excb_loss,
    excb_metrics,
    init_cluster_sizes,
    update_cluster_sizes,
)
from swav_jax.deepcluster import (
    cluster_bank,
    deepcluster_loss,
    gather_assignments,
    init_bank,
    update_bank,
)
from swav_jax.kmeans import spherical_kmeans
from swav_jax.losses import assign_codes, prototype_usage, swapped_prediction_loss, swav_loss
from swav_jax.sinkhorn import sinkhorn

__version__ = "0.1.0"

__all__ = [
    "assign_codes",
    "balance_similarities",
    "cluster_bank",
    "deepcluster_loss",
    "excb_loss",
    "excb_metrics",
    "gather_assignments",
    "init_bank",
    "init_cluster_sizes",
    "update_bank",
    "update_cluster_sizes",
    "prototype_usage",
    "sinkhorn",
    "spherical_kmeans",
    "swapped_prediction_loss",
    "swav_loss",
]
