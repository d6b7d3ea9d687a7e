"""swav_jax.deepcluster (bank, clustering into labels, loss) against the float64
reference of the release's procedure, sharded and unsharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from deepcluster_reference import IGNORE, assignments_ref, first_rows, kmeans_ref, loss_and_grad_ref
from swav_jax.deepcluster import (
    EMPTY,
    UNASSIGNED,
    cluster_bank,
    deepcluster_loss,
    gather_assignments,
    init_bank,
    update_bank,
)


def unit(rng, *shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# ---- the bank ------------------------------------------------------------------------


def test_update_bank_is_a_ring_over_the_last_epoch():
    rng = np.random.default_rng(0)
    views, batch, dim, steps_per_epoch = 4, 3, 5, 3
    crops = (2, 0)  # bank a holds view crops[a]
    bank, bank_index = init_bank(len(crops), steps_per_epoch * batch, dim)
    np.testing.assert_array_equal(bank, 0.0)
    np.testing.assert_array_equal(bank_index, EMPTY)
    update = jax.jit(functools.partial(update_bank, crops_for_assign=crops))
    written = {}  # step -> (embeddings, index)
    for step in range(8):  # two epochs and two steps: the ring wraps twice
        emb = unit(rng, views, batch, dim)
        index = rng.integers(0, 100, batch).astype(np.int32)
        written[step] = (emb, index)
        bank, bank_index = update(bank, bank_index, emb, index, jnp.int32(step))
        if step == 5:  # an epoch boundary: the bank is exactly the epoch just done
            np.testing.assert_array_equal(bank_index, np.concatenate([written[s][1] for s in (3, 4, 5)]))
    # Mid-epoch: slots 0 and 1 hold steps 6 and 7, slot 2 still step 5.
    expected = [written[s] for s in (6, 7, 5)]
    np.testing.assert_array_equal(bank_index, np.concatenate([i for _, i in expected]))
    for a, crop in enumerate(crops):
        np.testing.assert_array_equal(bank[a], np.concatenate([e[crop] for e, _ in expected]))


@pytest.mark.parametrize(
    "bank_shape,emb_shape,index_len,crops,match",
    [
        ((2, 12, 5), (4, 3, 5), 3, (0, 1, 2), "does not fit"),  # A != len(crops)
        ((2, 10, 5), (4, 3, 5), 3, (0, 1), "does not fit"),  # rows not a multiple of B
        ((2, 12, 6), (4, 3, 5), 3, (0, 1), "does not fit"),  # D differs
        ((2, 12, 5), (4, 3, 5), 3, (0, 4), "crops_for_assign"),
        ((2, 12, 5), (4, 3, 5), 3, (1, 1), "crops_for_assign"),
        ((2, 12, 5), (4, 3, 5), 4, (0, 1), "index"),
        ((12, 5), (4, 3, 5), 3, (0, 1), r"\[A, n, D\]"),
    ],
)
def test_update_bank_bad_shapes(bank_shape, emb_shape, index_len, crops, match):
    with pytest.raises(ValueError, match=match):
        update_bank(
            jnp.zeros(bank_shape), jnp.zeros(bank_shape[1:2], jnp.int32), jnp.zeros(emb_shape),
            jnp.zeros((index_len,), jnp.int32), 0, crops_for_assign=crops,
        )


# ---- labels of every sample ----------------------------------------------------------


def test_gather_assignments_matches_reference():
    rng = np.random.default_rng(1)
    num_samples, n = 25, 30
    labels = rng.integers(0, 7, size=(2, n)).astype(np.int32)
    labels[:, :4] = -1  # masked rows
    bank_index = rng.integers(0, num_samples, n).astype(np.int32)  # with repeats
    bank_index[4:6] = EMPTY
    bank_index[6] = num_samples  # out of range: skipped
    out = jax.jit(functools.partial(gather_assignments, num_samples=num_samples))(labels, bank_index)
    assert out.dtype == jnp.int32
    expected = assignments_ref(labels, bank_index, num_samples)
    np.testing.assert_array_equal(out, expected)
    assert np.any(expected == IGNORE) and len(set(bank_index)) < n  # both cases occur


@pytest.mark.parametrize(
    "labels_shape,index_len,kwargs,match",
    [
        ((2,), 2, {}, "labels"),
        ((2, 5), 4, {}, "bank_index"),
        ((2, 5), 5, dict(num_samples=0), "num_samples"),
    ],
)
def test_gather_assignments_bad_arguments(labels_shape, index_len, kwargs, match):
    kwargs = {"num_samples": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        gather_assignments(jnp.zeros(labels_shape, jnp.int32), jnp.zeros((index_len,), jnp.int32), **kwargs)


def cluster_ref(bank, bank_index, key, num_clusters, num_samples, num_iters, source_rows):
    """The release's cluster_memory in float64: head h on bank h % A, initial rows from
    the first `source_rows` rows (the index-0 device's shard)."""
    valid = bank_index >= 0
    keys = jax.random.split(key, len(num_clusters))
    centroids, labels = [], []
    for h, k in enumerate(num_clusters):
        rows = first_rows(keys[h], source_rows, k, valid[:source_rows])
        c, lab = kmeans_ref(np.where(valid[:, None], bank[h % len(bank)], 1.0), rows, num_iters, valid)
        centroids.append(c)
        labels.append(lab)
    return centroids, assignments_ref(np.stack(labels), bank_index, num_samples)


def test_cluster_bank_matches_reference():
    rng = np.random.default_rng(2)
    num_clusters, num_samples, n = (4, 5, 3), 50, 40
    bank = unit(rng, 2, n, 6)
    bank_index = rng.permutation(num_samples)[:n].astype(np.int32)
    bank_index[rng.choice(n, 5, replace=False)] = EMPTY  # rows not written
    bank[:, bank_index == EMPTY] = np.nan
    key = jax.random.key(3)
    fn = jax.jit(functools.partial(
        cluster_bank, num_clusters=num_clusters, num_samples=num_samples, num_iters=10
    ))
    centroids, assignments = fn(jnp.asarray(bank), jnp.asarray(bank_index), key)
    ref_c, ref_assignments = cluster_ref(bank, bank_index, key, num_clusters, num_samples, 10, n)
    for c, r in zip(centroids, ref_c, strict=True):
        np.testing.assert_allclose(c, r, atol=1e-5)
    np.testing.assert_array_equal(assignments, ref_assignments)
    assert assignments.shape == (3, num_samples) and np.sum(assignments[0] == UNASSIGNED) == 15
    with pytest.raises(ValueError, match="num_clusters"):
        cluster_bank(jnp.asarray(bank), jnp.asarray(bank_index), key, num_clusters=(), num_samples=50)


# ---- the loss ------------------------------------------------------------------------


def _loss_inputs(rng, num_clusters=(5, 7, 4), views=4, batch=6):
    scores = [(2 * unit(rng, views, batch, 8) @ unit(rng, k, 8).T).astype(np.float32) for k in num_clusters]
    labels = np.stack([rng.integers(0, k, batch) for k in num_clusters]).astype(np.int32)
    labels[rng.random(labels.shape) < 0.3] = IGNORE
    return scores, labels


def test_loss_matches_float64_cross_entropy_and_its_gradient():
    scores, labels = _loss_inputs(np.random.default_rng(4))
    assert np.any(labels == IGNORE) and np.any(labels != IGNORE)
    fn = jax.jit(jax.value_and_grad(functools.partial(deepcluster_loss, temperature=0.1)))
    loss, grads = fn([jnp.asarray(s) for s in scores], jnp.asarray(labels))
    ref_loss, ref_grads = loss_and_grad_ref(scores, labels, 0.1)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-6)


def test_loss_equals_torch_cross_entropy_with_ignore_index():
    torch = pytest.importorskip("torch")
    scores, labels = _loss_inputs(np.random.default_rng(5))
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
    expected = sum(
        # The V crops stacked, each sample's target repeated per crop (the release's .repeat).
        ce(torch.from_numpy(s.reshape(-1, s.shape[-1]) / 0.1), torch.from_numpy(np.tile(t, len(s))).long())
        for s, t in zip(scores, labels)
    ) / len(scores)
    loss = deepcluster_loss([jnp.asarray(s) for s in scores], jnp.asarray(labels), temperature=0.1)
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)


def test_loss_head_without_labels_and_bad_labels():
    scores, labels = _loss_inputs(np.random.default_rng(6), num_clusters=(5, 4))
    labels[1] = IGNORE
    loss, grads = jax.jit(jax.value_and_grad(deepcluster_loss))([jnp.asarray(s) for s in scores], labels)
    # Head 1 contributes 0 and no gradient; head 0 its loss, halved by the head mean.
    np.testing.assert_array_equal(grads[1], 0.0)
    np.testing.assert_allclose(loss, loss_and_grad_ref(scores[:1], labels[:1], 0.1)[0] / 2, rtol=1e-5)
    labels[0, 0] = 5  # not a cluster of head 0 (K = 5)
    assert np.isnan(jax.jit(deepcluster_loss)([jnp.asarray(s) for s in scores], labels))


@pytest.mark.parametrize(
    "score_shapes,labels_shape,kwargs,match",
    [
        ([], (0, 3), {}, "non-empty"),
        ([(2, 3)], (1, 3), {}, r"\[V, B, K\]"),
        ([(2, 3, 5), (2, 4, 5)], (2, 3), {}, "same"),
        ([(2, 3, 5)], (1, 4), {}, "labels"),
        ([(2, 3, 5)], (2, 3), {}, "labels"),
        ([(2, 3, 5)], (1, 3), dict(temperature=0.0), "temperature"),
    ],
)
def test_loss_bad_arguments(score_shapes, labels_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        deepcluster_loss([jnp.zeros(s) for s in score_shapes], jnp.zeros(labels_shape, jnp.int32), **kwargs)


# ---- sharded over eight devices: bank, clustering, labels, loss ------------------------


def order_for_same_initial_rows(key, num_clusters, n_local, n):
    """A row order of the whole (all-device) bank under which an unsharded cluster_bank
    starts every head at the points the sharded one takes from device 0's rows
    [0, n_local); None if the heads' needs conflict."""
    order = np.full(n, -1)
    for head_key, k in zip(jax.random.split(key, len(num_clusters)), num_clusters):
        positions = np.asarray(jax.random.permutation(head_key, n))[:k]  # unsharded initial rows
        for position, row in zip(positions, first_rows(head_key, n_local, k)):
            if order[position] != row and (order[position] != -1 or row in order):
                return None
            order[position] = row
    order[order == -1] = np.setdiff1d(np.arange(n), order)
    return order


def test_sharded_equals_unsharded_and_reference():
    mesh = jax.make_mesh((8,), ("data",))
    num_devices, batch, steps_per_epoch, dim, views = 8, 4, 3, 6, 3
    num_samples, num_clusters, crops, num_iters = 120, (3, 4), (0, 1), 5
    global_batch, n_local = num_devices * batch, steps_per_epoch * batch
    n = num_devices * n_local
    rng = np.random.default_rng(7)
    # The training stream: a new shuffle every pass, batches straddling passes.
    stream = np.concatenate([rng.permutation(num_samples) for _ in range(3)]).astype(np.int32)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731

    # Bank: steps 0 to 3 (the ring wraps: it ends with steps 3, 1, 2 in its slots).
    update = jax.jit(jax.shard_map(
        functools.partial(update_bank, crops_for_assign=crops), mesh=mesh,
        in_specs=(P(None, "data"), P("data"), P(None, "data"), P("data"), P()),
        out_specs=(P(None, "data"), P("data")),
    ))
    bank, bank_index = init_bank(len(crops), n, dim)
    bank, bank_index = put(bank, P(None, "data")), put(bank_index, P("data"))
    ref_bank = np.zeros((len(crops), n, dim), np.float32)
    ref_index = np.full(n, EMPTY)
    for step in range(steps_per_epoch + 1):
        emb = unit(rng, views, global_batch, dim)
        index = stream[step * global_batch:(step + 1) * global_batch]
        bank, bank_index = jax.block_until_ready(update(
            bank, bank_index, put(emb, P(None, "data")), put(index, P("data")), put(jnp.int32(step), P())
        ))
        for d in range(num_devices):  # device d's rows are [d * n_local, (d + 1) * n_local)
            start = d * n_local + (step % steps_per_epoch) * batch
            ref_bank[:, start:start + batch] = emb[list(crops), d * batch:(d + 1) * batch]
            ref_index[start:start + batch] = index[d * batch:(d + 1) * batch]
    np.testing.assert_array_equal(bank, ref_bank)
    np.testing.assert_array_equal(bank_index, ref_index)

    # Clustering, against the float64 reference (initial rows from device 0's shard).
    key = next(  # one whose initial rows an unsharded run can share (below)
        k for k in map(jax.random.key, range(50))
        if order_for_same_initial_rows(k, num_clusters, n_local, n) is not None
    )
    cluster = functools.partial(
        cluster_bank, num_clusters=num_clusters, num_samples=num_samples, num_iters=num_iters
    )
    sharded_cluster = jax.jit(jax.shard_map(
        functools.partial(cluster, axis_name="data"), mesh=mesh,
        in_specs=(P(None, "data"), P("data"), P()), out_specs=((P(), P()), P()),
    ))
    centroids, assignments = jax.block_until_ready(sharded_cluster(bank, bank_index, put(key, P())))
    ref_c, ref_assignments = cluster_ref(
        ref_bank, ref_index, key, num_clusters, num_samples, num_iters, source_rows=n_local
    )
    for c, r in zip(centroids, ref_c, strict=True):
        np.testing.assert_allclose(c, r, atol=1e-5)
    np.testing.assert_array_equal(assignments, ref_assignments)
    assert np.any(ref_assignments == IGNORE)  # samples the last epoch's steps missed

    # Unsharded, the rows reordered so that every head starts at the same points.
    order = order_for_same_initial_rows(key, num_clusters, n_local, n)
    one_c, one_assignments = jax.jit(cluster)(
        jnp.asarray(ref_bank[:, order]), jnp.asarray(ref_index[order]), key
    )
    for c, o in zip(centroids, one_c, strict=True):
        np.testing.assert_allclose(o, c, atol=1e-6)
    np.testing.assert_array_equal(one_assignments, assignments)

    # Loss of the next step's batch: per device, with its gradient.
    index = stream[4 * global_batch:5 * global_batch]
    emb = unit(rng, views, global_batch, dim)
    scores = [(emb @ np.asarray(c).T).astype(np.float32) for c in centroids]
    labels = np.asarray(assignments)[:, index]
    assert np.any(labels == IGNORE)
    loss_and_grad = jax.value_and_grad(deepcluster_loss)

    def local_loss(scores, labels):
        loss, grads = loss_and_grad(scores, labels)
        return loss[None], grads

    sharded_loss = jax.jit(jax.shard_map(
        local_loss, mesh=mesh, in_specs=(P(None, "data"), P(None, "data")), out_specs=(P("data"), P(None, "data")),
    ))
    losses, grads = jax.block_until_ready(
        sharded_loss([put(s, P(None, "data")) for s in scores], put(labels, P(None, "data")))
    )
    losses, grads = np.asarray(losses), [np.asarray(g) for g in grads]
    for d in range(num_devices):
        part = slice(d * batch, (d + 1) * batch)
        device_scores, device_labels = [s[:, part] for s in scores], labels[:, part]
        one_loss, one_grads = jax.jit(loss_and_grad)([jnp.asarray(s) for s in device_scores], device_labels)
        ref_loss, ref_grads = loss_and_grad_ref(device_scores, device_labels, 0.1)
        np.testing.assert_allclose(losses[d], one_loss, rtol=1e-6)
        np.testing.assert_allclose(losses[d], ref_loss, rtol=1e-5)
        for g, o, r in zip(grads, one_grads, ref_grads, strict=True):
            np.testing.assert_allclose(g[:, part], o, atol=1e-7)
            np.testing.assert_allclose(g[:, part], r, atol=1e-6)
