"""Training input: grain host pipeline -> global uint8 crop batches on the mesh.

The sample stream is one global, process-count independent sequence:

  source -> shuffle (reshuffled every epoch, seed c.seed) -> repeat forever
         -> MultiCrop random_map: decode into a canvas, draw crop boxes and flips
            (rng seeded by the seed and the stream position)
         -> bad records replaced -> batches of global_batch / process_count
         -> process p takes local batches p, p + P, p + 2P, ...
         -> global arrays on the mesh -> crops cut and resized on device
            (`crop_resize.crop_groups`, per device under shard_map)

so global step k holds stream elements [k * G, (k + 1) * G) in order, whatever the
number of processes or worker processes (host arrays are identical; a device-resized
pixel may round +-1 differently on another device layout). Everything up to the
batches is a grain `MapDataset` (random access), which is why the output does not
depend on `c.data.num_workers` or `c.data.read_threads`, and why the iterator state
is just the number of global batches consumed: it is identical on every process and
restored exactly, even onto another number of processes.

Bad records (see `multicrop.py`) come out of the random map as {'bad': why}; the
element at stream position i is then replaced by the element at i + N (same position,
next epoch: another image, other crops), or i + 2N, ... A bad record is reported only
at its position in the first pass over the data (i < N, where every record has exactly
one position, consumed by exactly one process): `TrainIterator.num_skipped` counts
distinct unreadable records, the counts of all processes add up without double
counting, and a warning names each record once.

Epochs: the stream never ends (num_epochs=None); a batch may straddle two epochs.
`steps_per_epoch(config, n) = n // c.batch_size` (remainder dropped) is the epoch
length schedules should use. With `c.data.drop_remainder` every pass keeps only its
first steps_per_epoch * c.batch_size elements (`PassPrefix`, the release's drop_last):
epoch e's steps are then exactly pass e, each sample at most once, as a method that
remembers samples per epoch needs (DeepCluster-v2's memory bank).

Checkpointing with orbax, beside the train state:
  save:    ocp.args.Composite(..., data=ocp.args.JsonSave(iterator.get_state()))
  restore: ocp.args.Composite(..., data=ocp.args.JsonRestore()), then
           iterator.set_state(restored['data'])  (or make_train_iterator(start_state=...)).
orbax writes the JSON from the primary process only; that is enough because the
position is the same everywhere.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
from typing import Any, Sequence

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from swav_jax.data.crop_resize import crop_groups
from swav_jax.data.multicrop import MultiCrop
from swav_jax.data.sources import make_source
from swav_jax.errors import DataError

log = logging.getLogger(__name__)

# Consecutive bad records (stream positions i, i + N, ...) tolerated before giving up.
MAX_REPLACEMENT_TRIES = 32


def steps_per_epoch(config, num_examples: int) -> int:
    """Global steps per epoch: num_examples // c.batch_size (remainder dropped)."""
    return num_examples // config.batch_size


def crop_program(config, mesh: jax.sharding.Mesh, data_axis: str | Sequence[str]):
    """The device half of multi-crop, run on every batch: jitted (canvas uint8 [G, C, C, 3],
    boxes float32 [G, V, 4], flip bool [G, V]), sharded over `data_axis` on G, -> crops,
    a tuple of uint8 [num_crops_g, G, S_g, S_g, 3] sharded PartitionSpec(None, data_axis)."""
    crops = functools.partial(crop_groups, size_crops=config.crops.size_crops, num_crops=config.crops.num_crops)
    return jax.jit(jax.shard_map(crops, mesh=mesh, in_specs=P(data_axis), out_specs=P(None, data_axis)))


def abstract_crop_inputs(config, mesh: jax.sharding.Mesh, data_axis: str | Sequence[str]) -> tuple:
    """ShapeDtypeStructs with shardings of `crop_program`'s (canvas, boxes, flip) for one
    global batch of `config` (what `TrainIterator` places on the mesh)."""
    g, c, v = int(config.batch_size), int(config.data.canvas_size), sum(config.crops.num_crops)
    sharding = NamedSharding(mesh, P(data_axis))
    return (
        jax.ShapeDtypeStruct((g, c, c, 3), np.uint8, sharding=sharding),
        jax.ShapeDtypeStruct((g, v, 4), np.float32, sharding=sharding),
        jax.ShapeDtypeStruct((g, v), np.bool_, sharding=sharding),
    )


def data_axis_size(mesh: jax.sharding.Mesh, data_axis: str | Sequence[str]) -> int:
    """Number of devices along `data_axis` (a mesh axis name or a tuple of them)."""
    axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"data_axis {a!r} is not an axis of the mesh {dict(mesh.shape)}")
    return math.prod(mesh.shape[a] for a in axes)


def _check_process_split(config, process_count: int) -> None:
    if config.batch_size % process_count:
        raise ValueError(f"c.batch_size={config.batch_size} does not divide over {process_count} processes")


class ReplaceBad(grain.MapDataset):
    """Fills each bad element ({'bad': why}) at position i with the first good one at
    i + k * period.

    Elements gain 'skipped': `why` of the bad record at position i if i is in the first
    pass (i < period), else None. The parent must be indexable past `period` (a
    repeated data set).
    """

    def __init__(self, parent: grain.MapDataset, period: int):
        super().__init__(parent)
        self._period = period

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"ReplaceBad(period={self._period})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        skipped = None
        for k in range(MAX_REPLACEMENT_TRIES):
            element = self._parent[index + k * self._period]
            if "bad" not in element:
                return {**element, "skipped": skipped}
            if k == 0 and index < self._period:
                skipped = element["bad"]
        raise DataError(
            f"c.data: none of {MAX_REPLACEMENT_TRIES} records in a row (stream positions {index} + k * "
            f"{self._period}) could be decoded, e.g. {element['bad']}. Is c.data pointing at an image data set?"
        )


class PassPrefix(grain.MapDataset):
    """The first `kept` elements of every pass of `period` over the parent (a repeated
    data set): position i reads the parent's (i // kept) * period + i % kept."""

    def __init__(self, parent: grain.MapDataset, period: int, kept: int):
        super().__init__(parent)
        self._period, self._kept = period, kept

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"PassPrefix(period={self._period}, kept={self._kept})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        passes, position = divmod(index, self._kept)
        return self._parent[passes * self._period + position]


def _with_index(num_records: int, index: int, record: dict[str, Any]) -> dict[str, Any]:
    # Indices past the end reach here through `repeat`; the source wraps them.
    return {**record, "index": index % num_records}


class StackBatch:
    """grain batch_fn: stacks element fields, into shared memory inside grain workers.

    grain calls `enable_shared_memory_output` in worker processes; the large canvas
    batch is then written once, straight into the block the main process reads,
    instead of stacked and copied.
    """

    def __init__(self):
        self._shared = False

    def enable_shared_memory_output(self) -> None:
        self._shared = True

    def _stack(self, arrays: list[np.ndarray]) -> np.ndarray:
        shape, dtype = (len(arrays),) + arrays[0].shape, arrays[0].dtype
        out = grain.multiprocessing.SharedMemoryArray(shape, dtype) if self._shared else np.empty(shape, dtype)
        return np.stack(arrays, out=out)

    def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "canvas": self._stack([e["canvas"] for e in elements]),
            "boxes": np.stack([e["boxes"] for e in elements]),
            "flip": np.stack([e["flip"] for e in elements]),
            "label": np.array([e["label"] for e in elements], np.int32),
            "index": np.array([e["index"] for e in elements], np.int64),
            "skipped": [e["skipped"] for e in elements if e["skipped"] is not None],
        }


def host_dataset(
    config,
    source,
    *,
    seed: int,
    shard_options: grain.sharding.ShardOptions,
    start_batch: int = 0,
) -> grain.IterDataset:
    """This process's batches of the global stream, from global step `start_batch` on.

    Returns a grain IterDataset of dicts, B = c.batch_size / shard_count,
    C = c.data.canvas_size, V = sum(c.crops.num_crops):
      'canvas':   uint8 [B, C, C, 3]  decoded images, top-left aligned
      'boxes':    float32 [B, V, 4]   crop boxes (top, left, height, width), canvas pixels
      'flip':     bool [B, V]
      'label':    int32 [B]  (-1 when unlabeled)
      'index':    int64 [B]  record index in the source
      'skipped':  list of str, the bad records met at their first-pass position
    """
    count, index = shard_options.shard_count, shard_options.shard_index
    _check_process_split(config, count)
    if len(source) == 0:
        raise ValueError(f"c.data: the data source {source!r} is empty")
    ds = grain.MapDataset.source(source).map_with_index(functools.partial(_with_index, len(source)))
    ds = ds.seed(seed).shuffle().repeat(None)
    period = len(source)
    if config.data.drop_remainder:
        period = steps_per_epoch(config, len(source)) * config.batch_size
        ds = PassPrefix(ds, period=len(source), kept=period)
    ds = ds.random_map(MultiCrop.from_config(config))
    ds = ReplaceBad(ds, period=period)
    ds = ds.batch(config.batch_size // count, drop_remainder=True, batch_fn=StackBatch())
    ds = ds[index + start_batch * count :: count]
    threads = config.data.read_threads
    # Each element is a whole batch: keep the in-process buffer to one per thread.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, threads)))
    if config.data.num_workers > 0:
        # grain <= 0.2.18 reads an absl flag in mp_prefetch and fails in programs
        # that never parse absl flags (google/grain#1355); defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    return ds


class TrainIterator:
    """Global multi-crop batches on the mesh, `c.data.prefetch` of them ahead on device.

    `next(it)` gives {'crops': tuple of uint8 jax.Array [num_crops_g, G, S_g, S_g, 3]
    sharded PartitionSpec(None, data_axis), 'label': int32 jax.Array [G] and 'index':
    int32 jax.Array [G] (each sample's record index in the source, for methods that
    remember samples across steps), both sharded PartitionSpec(data_axis)},
    G = c.batch_size.
    """

    def __init__(self, config, source, *, mesh, data_axis, seed, shard_options):
        self._config = config
        self._source = source
        self._seed = int(seed)
        self._shard_options = shard_options
        self.global_batch = int(config.batch_size)
        self.num_examples = len(source)
        if self.global_batch > self.num_examples:
            raise ValueError(
                f"c.batch_size={self.global_batch} exceeds the {self.num_examples} examples of {source!r}"
            )
        if self.num_examples > np.iinfo(np.int32).max:
            raise ValueError(f"{source!r} has {self.num_examples} records; sample indices are int32")
        n_data = data_axis_size(mesh, data_axis)
        if self.global_batch % n_data:
            raise ValueError(
                f"c.batch_size={self.global_batch} does not divide over the {n_data} devices of "
                f"mesh axis {data_axis!r}"
            )
        _check_process_split(config, shard_options.shard_count)
        if config.data.prefetch < 0:
            raise ValueError(f"c.data.prefetch must be >= 0, got {config.data.prefetch}")
        self.steps_per_epoch = steps_per_epoch(config, self.num_examples)
        self._batch_sharding = NamedSharding(mesh, P(data_axis))
        self._crop_fn = crop_program(config, mesh, data_axis)
        self._prefetch = int(config.data.prefetch)
        self._next_batch = 0  # global batches handed out
        # Distinct unreadable records met in the batches this process has handed out
        # since it was created or repositioned.
        self.num_skipped = 0
        self._host_iter = None
        self._queue: collections.deque = collections.deque()

    def __iter__(self) -> "TrainIterator":
        return self

    def _to_device(self, host: dict[str, Any]) -> tuple[dict[str, jax.Array], list[str]]:
        g = self.global_batch
        host = {**host, "index": host["index"].astype(np.int32)}
        canvas, boxes, flip, label, index = (
            jax.make_array_from_process_local_data(self._batch_sharding, host[k], (g,) + host[k].shape[1:])
            for k in ("canvas", "boxes", "flip", "label", "index")
        )
        batch = {"crops": self._crop_fn(canvas, boxes, flip), "label": label, "index": index}
        return batch, host["skipped"]

    def _fetch(self) -> None:
        if self._host_iter is None:
            start = self._next_batch + len(self._queue)
            self._host_iter = iter(
                host_dataset(
                    self._config, self._source, seed=self._seed,
                    shard_options=self._shard_options, start_batch=start,
                )
            )
        self._queue.append(self._to_device(next(self._host_iter)))

    def __next__(self) -> dict[str, jax.Array]:
        while len(self._queue) < self._prefetch + 1:
            self._fetch()
        batch, skipped = self._queue.popleft()
        self._next_batch += 1
        for why in skipped:
            self.num_skipped += 1
            log.warning("data: skipping unreadable %s", why)
        return batch

    def get_state(self) -> dict[str, int]:
        """JSON-able position: the next global batch this iterator will return."""
        return {
            "next_batch": self._next_batch,
            "seed": self._seed,
            "batch_size": self.global_batch,
            "num_examples": self.num_examples,
        }

    def set_state(self, state: dict[str, int]) -> None:
        """Continue from `state` (from `get_state`, possibly of another run)."""
        for key, mine in (("seed", self._seed), ("batch_size", self.global_batch),
                          ("num_examples", self.num_examples)):
            if int(state[key]) != mine:
                raise ValueError(
                    f"data iterator state was saved with {key}={state[key]}, this run has "
                    f"{key}={mine} (c.seed / c.batch_size / c.data): the saved position "
                    "would not mean the same batches"
                )
        self.close()
        self._next_batch = int(state["next_batch"])
        self.num_skipped = 0

    def close(self) -> None:
        """Drops prefetched batches and stops grain's worker processes."""
        self._queue.clear()
        if self._host_iter is not None:
            self._host_iter.close()
            self._host_iter = None


def make_train_iterator(
    config,
    *,
    mesh: jax.sharding.Mesh,
    data_axis: str | tuple[str, ...] = "data",
    seed: int | None = None,
    start_state: dict[str, int] | None = None,
    source=None,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> TrainIterator:
    """The training batch iterator of `config` on `mesh`.

    Args:
      config: full config (c.batch_size, c.seed, c.data, c.crops).
      mesh: the device mesh; batches are sharded over `data_axis`.
      data_axis: mesh axis name, or tuple of names, the batch is split over.
      seed: defaults to c.seed.
      start_state: a `get_state()` result to resume from.
      source: defaults to make_source(c.data, c.data.split).
      shard_options: defaults to this JAX process's shard (grain ShardByJaxProcess).
    """
    source = make_source(config.data, config.data.split) if source is None else source
    shard_options = shard_options or grain.sharding.ShardByJaxProcess()
    it = TrainIterator(
        config, source, mesh=mesh, data_axis=data_axis,
        seed=config.seed if seed is None else seed, shard_options=shard_options,
    )
    if start_state is not None:
        it.set_state(start_state)
    return it
