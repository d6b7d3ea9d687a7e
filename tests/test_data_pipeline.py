"""Sources, the grain host pipeline and the sharded global batches on 8 host devices."""

import io
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from sklearn.datasets import load_digits

from swav_jax.configs.base import get_config
from swav_jax.data import pipeline, sources
from swav_jax.data.crop_resize import crop_groups
from swav_jax.errors import DataError


def small_config(**data):
    c = get_config()
    c.batch_size = 8
    c.seed = 5
    c.data.num_workers = 0
    c.data.read_threads = 1
    c.data.prefetch = 2
    c.data.canvas_size = 24
    c.crops.size_crops = (12, 6)
    c.crops.num_crops = (2, 3)
    for k, v in data.items():
        c.data[k] = v
    return c


def array_source(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return sources.ArraySource(rng.integers(0, 256, (n, 18, 22, 3), dtype=np.uint8), np.arange(n) % 4)


def jpeg(seed, size=(20, 16)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class ListSource:
    def __init__(self, records):
        self._records = records

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]


def take(ds_or_it, n):
    it = iter(ds_or_it)
    out = [next(it) for _ in range(n)]
    if hasattr(it, "close"):
        it.close()
    return out


HOST_KEYS = ("canvas", "boxes", "flip", "label", "index", "skipped")


def assert_host_batches_equal(a, b):
    for k in HOST_KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_device_batches_equal(a, b):
    assert len(a["crops"]) == len(b["crops"])
    for x, y in zip(a["crops"], b["crops"]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for key in ("label", "index"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()), ("data",))


# ---------------------------------------------------------------- sources
def test_folder_source_with_classes_and_flat(tmp_path):
    for cls, n in (("zebra", 2), ("ant", 3)):
        os.makedirs(tmp_path / "train" / cls / "sub")
        for i in range(n):
            (tmp_path / "train" / cls / f"{i}.jpg").write_bytes(jpeg(i))
        (tmp_path / "train" / cls / "sub" / "x.PNG").write_bytes(jpeg(9))
        (tmp_path / "train" / cls / "notes.txt").write_text("not an image")
    c = small_config(source="folder", data_dir=str(tmp_path))
    src = sources.make_source(c.data, "train")
    assert len(src) == 7 and src.classes == ["ant", "zebra"]
    labels = [src[i]["label"] for i in range(len(src))]
    assert labels == [0, 0, 0, 0, 1, 1, 1]
    assert src[0]["image"] == jpeg(0)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpeg").write_bytes(jpeg(1))
    c.data.data_dir = str(flat)
    src = sources.make_source(c.data, "train")
    assert len(src) == 1 and src[0]["label"] == -1


def test_folder_source_errors(tmp_path):
    c = small_config(source="folder", data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="c.data.data_dir.*does not exist"):
        sources.make_source(c.data, "train")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    c.data.data_dir = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="c.data.data_dir: no image files"):
        sources.make_source(c.data, "train")
    with pytest.raises(ValueError, match="no folder 'validation'"):
        sources.make_source(c.data, "validation")
    c.data.source = "nope"
    with pytest.raises(ValueError, match="c.data.source"):
        sources.make_source(c.data, "train")


def test_digits_source():
    c = small_config(source="digits", image_size=16)
    train, test = sources.make_source(c.data, "train"), sources.make_source(c.data, "test")
    assert (len(train), len(test)) == (1437, 360)
    rec = train[0]
    assert rec["image"].shape == (16, 16, 3) and rec["image"].dtype == np.uint8
    assert rec["label"] == 0 and test[0]["label"] == load_digits().target[1437]
    assert rec["image"].max() > 200  # 0..16 scaled to 0..255
    with pytest.raises(ValueError, match="split"):
        sources.make_source(c.data, "validation")


def test_array_source_validation():
    with pytest.raises(ValueError, match="uint8"):
        sources.ArraySource(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="labels"):
        sources.ArraySource(np.zeros((2, 4, 4, 3), np.uint8), [1])
    assert sources.ArraySource(np.zeros((2, 4, 4), np.uint8))[1]["label"] == -1


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny ArrayRecord TFDS data set written by tfds itself (no TensorFlow)."""
    import tensorflow_datasets as tfds

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"image": tfds.features.Image(shape=(None, None, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12)}

        def _generate_examples(self, n):
            for i in range(n):  # encoded files: tfds then needs no TensorFlow to write them
                yield i, {"image": io.BytesIO(jpeg(i)), "label": i % 3}

    d = str(tmp_path_factory.mktemp("tfds"))
    TinyImages(data_dir=d, file_format="array_record").download_and_prepare()
    return d


def test_tfds_source(tfds_dir, mesh):
    c = small_config(source="tfds", name="tiny_images", data_dir=tfds_dir)
    src = sources.make_source(c.data, "train")
    assert len(src) == 12
    labels = sorted(src[i]["label"] for i in range(12))
    assert labels == sorted(i % 3 for i in range(12))
    assert isinstance(src[0]["image"], bytes) and src[0]["image"][:2] == b"\xff\xd8"
    batch = next(pipeline.make_train_iterator(c, mesh=mesh))
    assert batch["crops"][0].shape == (2, 8, 12, 12, 3)
    with pytest.raises(ValueError, match="c.data.name='no_such_data'"):
        c.data.name = "no_such_data"
        sources.make_source(c.data, "train")


# ---------------------------------------------------------------- host pipeline
def test_host_batches_cover_each_epoch_once():
    c = small_config()
    batches = take(pipeline.host_dataset(c, array_source(), seed=1, shard_options=grain.sharding.NoSharding()), 6)
    idx = np.concatenate([b["index"] for b in batches])
    assert sorted(idx[:24]) == list(range(24)) and sorted(idx[24:]) == list(range(24))
    assert not np.array_equal(idx[:24], idx[24:])  # reshuffled every epoch
    b = batches[0]
    assert b["canvas"].shape == (8, 24, 24, 3) and b["canvas"].dtype == np.uint8
    assert b["boxes"].shape == (8, 5, 4) and b["flip"].shape == (8, 5)
    np.testing.assert_array_equal(b["label"], b["index"] % 4)


def test_drop_remainder_makes_each_epoch_one_pass():
    # 30 records, batch 8: 3 steps per epoch; 6 records of every pass dropped.
    opts = grain.sharding.NoSharding()
    dropped = take(pipeline.host_dataset(small_config(drop_remainder=True), array_source(30), seed=1,
                                         shard_options=opts), 9)
    whole = take(pipeline.host_dataset(small_config(), array_source(30), seed=1, shard_options=opts), 15)
    idx = np.concatenate([b["index"] for b in dropped]).reshape(3, 24)  # [epoch, position]
    passes = np.concatenate([b["index"] for b in whole])[:90].reshape(3, 30)
    # Epoch e is the first 24 records of pass e's permutation (the same permutations).
    np.testing.assert_array_equal(idx, passes[:, :24])
    assert all(len(set(e)) == 24 for e in idx) and not np.array_equal(idx[0], idx[1])


def test_same_batches_whatever_the_worker_and_thread_count(mesh):
    src = array_source()
    c0 = small_config(num_workers=0, read_threads=0)
    c2 = small_config(num_workers=2, read_threads=2)
    opts = grain.sharding.NoSharding()
    a = take(pipeline.host_dataset(c0, src, seed=3, shard_options=opts), 3)
    b = take(pipeline.host_dataset(c2, src, seed=3, shard_options=opts), 3)
    for x, y in zip(a, b):
        assert_host_batches_equal(x, y)
    # and on the mesh, from worker processes' shared-memory batches
    a = take(pipeline.make_train_iterator(c0, mesh=mesh, source=src), 2)
    b = take(pipeline.make_train_iterator(c2, mesh=mesh, source=src), 2)
    for x, y in zip(a, b):
        assert_device_batches_equal(x, y)


def test_process_shards_are_disjoint_cover_and_match_one_process():
    c = small_config()
    c.batch_size = 6
    src = array_source(24)
    steps = 4  # one epoch
    one = take(pipeline.host_dataset(c, src, seed=2, shard_options=grain.sharding.NoSharding()), steps)
    per_process = [
        take(pipeline.host_dataset(c, src, seed=2, shard_options=grain.sharding.ShardOptions(p, 3)), steps)
        for p in range(3)
    ]
    seen = np.concatenate([b["index"] for shard in per_process for b in shard])
    assert len(seen) == 24 and sorted(seen) == list(range(24))
    for k in range(steps):  # global batch k is the same whatever the process count
        joined = {key: np.concatenate([per_process[p][k][key] for p in range(3)]) for key in HOST_KEYS}
        assert_host_batches_equal(joined, one[k])


def test_bad_records_are_replaced_and_each_counted_once(mesh, caplog):
    records = [{"image": jpeg(i), "label": i} for i in range(16)]
    bad = {3: b"garbage", 7: jpeg(7)[:40], 12: b""}
    for i, data in bad.items():
        records[i] = {"image": data, "label": i, "path": f"bad{i}.jpg"}
    c = small_config()
    opts = grain.sharding.NoSharding()
    with caplog.at_level(logging.WARNING):
        it = pipeline.make_train_iterator(c, mesh=mesh, source=ListSource(records))
        host = take(pipeline.host_dataset(c, ListSource(records), seed=c.seed, shard_options=opts), 6)
        for _ in range(6):  # three epochs of 16
            batch = next(it)
            assert batch["crops"][0].shape == (2, 8, 12, 12, 3)
    # The record order of the same stream without bad records (same seed, same length)
    # says which positions hold bad records and what replaces them: position i + 16 k.
    good = ListSource([{"image": jpeg(i), "label": i} for i in range(16)])
    order = np.concatenate([b["index"] for b in take(pipeline.host_dataset(c, good, seed=c.seed, shard_options=opts), 14)])
    want_idx = []
    for i in range(48):
        k = next(k for k in range(4) if order[i + 16 * k] not in bad)
        want_idx.append(order[i + 16 * k])
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in host]), want_idx)
    # Met in each of the three passes, each bad record is reported once: at its
    # position in the first pass.
    reported = [why.split(" ")[0] for b in host for why in b["skipped"]]
    assert sorted(reported) == ["bad12.jpg", "bad3.jpg", "bad7.jpg"]
    assert all(not b["skipped"] for b in host[2:])
    assert it.num_skipped == 3
    assert caplog.text.count("skipping unreadable") == 3 and "bad7.jpg (" in caplog.text
    it.close()


def test_all_bad_data_fails_clearly(mesh):
    c = small_config()
    it = pipeline.make_train_iterator(c, mesh=mesh, source=ListSource([{"image": b"x", "label": 0}] * 8))
    with pytest.raises(DataError, match=r"none of 32 records in a row .* could be decoded, e.g. record \d+ \("):
        next(it)


# ---------------------------------------------------------------- global batches
def test_global_batches_are_sharded_over_the_data_axis(mesh):
    c = small_config()
    c.batch_size = 16
    it = pipeline.make_train_iterator(c, mesh=mesh, source=array_source(40))
    batch = next(it)
    for crops, size, n in zip(batch["crops"], (12, 6), (2, 3)):
        assert crops.shape == (n, 16, size, size, 3) and crops.dtype == np.uint8
        assert crops.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 5)
        assert {s.data.shape for s in crops.addressable_shards} == {(n, 2, size, size, 3)}
    for key in ("label", "index"):
        assert batch[key].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1)
        assert batch[key].dtype == np.int32
    assert it.num_examples == 40 and it.steps_per_epoch == pipeline.steps_per_epoch(c, 40) == 2
    host = take(pipeline.host_dataset(c, array_source(40), seed=c.seed, shard_options=grain.sharding.NoSharding()), 1)[0]
    want = crop_groups(host["canvas"], host["boxes"], host["flip"], c.crops.size_crops, c.crops.num_crops)
    for got, w in zip(jax.block_until_ready(batch)["crops"], want):
        assert np.abs(np.asarray(got).astype(int) - np.asarray(w)).max() <= 1
    np.testing.assert_array_equal(np.asarray(batch["label"]), host["label"])
    np.testing.assert_array_equal(np.asarray(batch["index"]), host["index"])
    # The record index: array_source labels record i with i % 4.
    np.testing.assert_array_equal(np.asarray(batch["label"]), np.asarray(batch["index"]) % 4)
    it.close()


@pytest.mark.parametrize("make_mesh", ["Mesh", "jax.make_mesh"])  # auto and explicit axes
def test_tuple_data_axis(make_mesh):
    if make_mesh == "Mesh":
        grouped = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "bn"))
    else:
        grouped = jax.make_mesh((4, 2), ("data", "bn"))
    it = pipeline.make_train_iterator(small_config(), mesh=grouped, data_axis=("data", "bn"), source=array_source())
    batch = jax.block_until_ready(next(it))
    assert batch["crops"][1].sharding.is_equivalent_to(NamedSharding(grouped, P(None, ("data", "bn"))), 5)
    starts = sorted(s.index[1].start for s in batch["crops"][1].addressable_shards)
    assert starts == list(range(8))  # one example per device, all different
    it.close()


def test_resume_equals_uninterrupted(mesh, tmp_path):
    c = small_config()
    src = array_source()
    full = [jax.device_get(b) for b in take(pipeline.make_train_iterator(c, mesh=mesh, source=src), 5)]
    it = pipeline.make_train_iterator(c, mesh=mesh, source=src)
    next(it), next(it)  # noqa: B018 -- two steps, then checkpoint (with 2 more prefetched)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(2, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
    manager.wait_until_finished()
    it.close()
    restored = manager.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    assert restored["data"]["next_batch"] == 2
    resumed = pipeline.make_train_iterator(c, mesh=mesh, source=src, start_state=restored["data"])
    for k in range(2, 5):
        assert_device_batches_equal(next(resumed), full[k])
    resumed.set_state(restored["data"])  # set_state rewinds a running iterator too
    assert_device_batches_equal(next(resumed), full[2])
    resumed.close()
    manager.close()


def test_start_errors(mesh):
    src = array_source()
    c = small_config()
    c.batch_size = 12  # not a multiple of 8 devices
    with pytest.raises(ValueError, match="c.batch_size=12 does not divide over the 8 devices"):
        pipeline.make_train_iterator(c, mesh=mesh, source=src)
    c.batch_size = 8
    with pytest.raises(ValueError, match="c.batch_size=8 does not divide over 3 processes"):
        pipeline.make_train_iterator(c, mesh=mesh, source=src, shard_options=grain.sharding.ShardOptions(0, 3))
    c.batch_size = 32
    with pytest.raises(ValueError, match="exceeds the 24 examples"):
        pipeline.make_train_iterator(c, mesh=mesh, source=src)
    c.batch_size = 8
    with pytest.raises(ValueError, match="data_axis 'batch'"):
        pipeline.make_train_iterator(c, mesh=mesh, data_axis="batch", source=src)
    it = pipeline.make_train_iterator(c, mesh=mesh, source=src)
    with pytest.raises(ValueError, match="batch_size=16"):
        it.set_state({**it.get_state(), "batch_size": 16})
