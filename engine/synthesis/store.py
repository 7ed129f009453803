"""The synthetic store (``synthetic.zarr``, Zarr v3 on any fsspec URL; schema in DESIGN.md).

One row per candidate sample, in sample-id order (patient, slice, draw):

| array | dtype, shape | chunks (shards) |
|---|---|---|
| ``image`` | float32 [N, H, W], intensities in [0, 1] | one sample per chunk, ``shard_size`` per shard |
| ``label`` | uint8 [N, H, W], DOMAIN labels, scar = the filter's prediction | as ``image`` |
| ``condition`` | uint8 [N, H, W], the conditioning scar mask | as ``image`` |
| ``dice``, ``passed`` | float32 / bool [N] | ``shard_size`` |
| ``sample_id``, ``source``, ``caption``, ``spec``, ``skip_reason`` | str [N] | ``shard_size`` |
| ``seed`` | int64 [N] | ``shard_size`` |
| ``shard_complete`` | uint8 [n_shards], 1 once a shard is written whole | 1 |

Chunk keys are zarr v3's default encoding with a "." separator (``image/c.<shard>.0.0``,
``shard_complete/c.<shard>``): an array's objects lie in its own folder, so a local store makes
no folder per shard and array (a ``mkdir`` costs as much as writing a shard object there).
Row ``i`` belongs to shard ``i // shard_size``. A shard is the unit of work of the synthesis
pipeline: exactly one writer writes all its rows (each array's shard object in one put), then sets
its ``shard_complete`` flag; a shard whose flag is 0 is rewritten whole by the next run, so a crash
at any point leaves nothing half-counted. ``skip_reason`` is empty for generated candidates and
says why for a candidate whose slice could not take a scar (such rows are never ``passed``).
Rejected candidates keep their images only with ``keep_rejected``; otherwise image, label and
condition of those rows stay empty (zero, not stored) and only their metadata is kept.
The readers (:func:`read_synthetic_arrays`, :class:`SyntheticDataset`, :func:`read_store_dataset`)
return, and count, only rows of complete shards: a shard left incomplete by a stopped run may hold
some of its arrays and not others (on object storage its objects are put concurrently).

Attributes (``group.attrs["lgesynth"]``): format version, engine version, the synthesis config,
scar sampler and data config, checkpoint sha256s, seed, the plan's fingerprint, and the sources
that could not take a candidate at all. Readable with plain ``zarr.open_group(url)``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from engine import failpoints

FORMAT_VERSION = 1
ATTRS_KEY = "lgesynth"
IMAGE_ARRAYS = {"image": "float32", "label": "uint8", "condition": "uint8"}
ROW_ARRAYS = {"dice": "float32", "passed": "bool", "seed": "int64"}
TEXT_ARRAYS = ("sample_id", "source", "caption", "spec", "skip_reason")
# zarr v3 dimension names, so xarray opens a store as a Dataset (``xr.open_zarr(url)``): one sample
# dimension shared by every per-sample array, the image axes, and the shard flags' own axis
DIMENSIONS = {"image": ("sample", "y", "x"), "row": ("sample",), "marker": ("shard",)}
MARKER = "shard_complete"
CHUNK_KEYS = {"name": "default", "separator": "."}
REQUIRED = ("image", "label", "passed")
READ_CONCURRENCY = 64  # chunk reads in flight while a whole array is read (zarr's default: 10)
SHARDS_PER_READ_TASK = 4  # shards a Ray Data read call fetches at once (one store opening for them)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreLayout:
    """Shape of a store: ``rows`` candidates of ``height`` x ``width`` in shards of ``shard_size``."""

    rows: int
    height: int
    width: int
    shard_size: int

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_size)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """``(start, stop)`` rows of ``shard``."""
        if not 0 <= shard < self.shards:
            raise IndexError(f"shard {shard} out of range 0..{self.shards - 1}")
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.rows)

    def shard_sizes(self) -> np.ndarray:
        """Candidates of every shard (the last one may hold fewer)."""
        return np.minimum(self.shard_size, self.rows - np.arange(self.shards) * self.shard_size)

    @classmethod
    def of_group(cls, group) -> StoreLayout:
        n, h, w = group["image"].shape
        return cls(rows=int(n), height=int(h), width=int(w), shard_size=int(group["dice"].chunks[0]))


def _storage_options(url: str, storage_options: Mapping[str, Any] | None) -> dict | None:
    """fsspec options only for URLs (zarr refuses them for local paths)."""
    return dict(storage_options) if storage_options and "://" in str(url) else None


def open_store(url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None):
    """The store's root group (``mode`` as :func:`zarr.open_group`); errors name the store."""
    import zarr

    try:
        return zarr.open_group(url, mode=mode, storage_options=_storage_options(url, storage_options))
    except Exception as exc:  # noqa: BLE001 - report which store and why
        raise ValueError(f"{url}: cannot open the synthetic store ({type(exc).__name__}: {exc})") from exc


def store_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    import zarr

    try:
        zarr.open_group(url, mode="r", storage_options=_storage_options(url, storage_options))
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return False


COMPRESSION = ("fast", "small", "none")


def compressors(compression: str, name: str):
    """The ``compressors`` of array ``name`` (``zarr.create_array``) under a store compression:

    * "fast" (default): the float image raw, label and condition Blosc-LZ4, row and text arrays
      raw. A generated LGE image is mostly noise: zarr's default zstd shrinks it by ~15% at ~80
      MB/s of one core, slower than a local disk or a cluster's network takes the raw bytes; the
      uint8 masks shrink ~100x at over 1 GB/s with LZ4. A row or text chunk (a shard's dice,
      captions...) is ~1% of a shard's bytes, and zstd costs ~30 us a chunk however small it is.
    * "small": zarr's default (zstd) everywhere: the smallest store (slow object storage, costly bytes).
    * "none": nothing compressed.
    """
    if compression not in COMPRESSION:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSION)}, got {compression!r}")
    if compression == "none":
        return None
    if compression == "small":
        return "auto"
    if name not in IMAGE_ARRAYS:
        return None
    if IMAGE_ARRAYS[name] == "float32":
        return None
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle", typesize=1)


def create_store(url: str, layout: StoreLayout, attrs: Mapping[str, Any],
                 storage_options: Mapping[str, Any] | None = None, compression: str = "fast"):
    """Create an empty store of ``layout`` with provenance ``attrs`` (under ``attrs["lgesynth"]``),
    its arrays compressed as :func:`compressors` says for ``compression``. An earlier store at
    ``url`` is replaced; any other objects there are refused, never erased.

    Raises:
        ValueError: ``url`` holds objects that are not a Zarr store (a run folder, say), or the
            store cannot be created (a missing bucket, no permission); the URL and the reason named.
    """
    import zarr

    compressors(compression, "image")  # refuse an unknown name before anything is written
    try:
        group = zarr.open_group(url, mode="w-", storage_options=_storage_options(url, storage_options))
    except FileExistsError:  # "w" would empty the path: only an earlier store is replaced
        if not store_exists(url, storage_options):
            raise ValueError(f"{url}: cannot create the synthetic store there: the path already holds objects "
                             "that are not a Zarr store, which creating it would erase; choose a new or empty "
                             "path") from None
        group = open_store(url, "w", storage_options)
    except Exception as exc:  # noqa: BLE001 - name the store and why (a missing bucket, no permission)
        raise ValueError(f"{url}: cannot create the synthetic store ({type(exc).__name__}: {exc})") from exc
    n, h, w, s = layout.rows, layout.height, layout.width, layout.shard_size
    for name, dtype in IMAGE_ARRAYS.items():
        group.create_array(name, shape=(n, h, w), chunks=(1, h, w), shards=(s, h, w), dtype=dtype, fill_value=0,
                           compressors=compressors(compression, name), chunk_key_encoding=CHUNK_KEYS,
                           dimension_names=DIMENSIONS["image"])
    for name, dtype in ROW_ARRAYS.items():
        group.create_array(name, shape=(n,), chunks=(s,), dtype=dtype, fill_value=0,
                           compressors=compressors(compression, name), chunk_key_encoding=CHUNK_KEYS,
                           dimension_names=DIMENSIONS["row"])
    for name in TEXT_ARRAYS:
        group.create_array(name, shape=(n,), chunks=(s,), dtype=str, compressors=compressors(compression, name),
                           chunk_key_encoding=CHUNK_KEYS, dimension_names=DIMENSIONS["row"])
    group.create_array(MARKER, shape=(layout.shards,), chunks=(1,), dtype="uint8", fill_value=0,
                       chunk_key_encoding=CHUNK_KEYS, dimension_names=DIMENSIONS["marker"])
    group.attrs[ATTRS_KEY] = dict(attrs)
    return group


def store_attrs(group) -> dict[str, Any]:
    return dict(group.attrs.get(ATTRS_KEY, {}))


def creation_interrupted(group) -> bool:
    """Whether ``group`` is what :func:`create_store` leaves when stopped before its last step (the
    attributes): no attributes, no member but the schema's arrays, no shard complete. Nothing was
    written to it: it may be created anew."""
    members = set(group.keys())
    return (not dict(group.attrs) and members <= {*IMAGE_ARRAYS, *ROW_ARRAYS, *TEXT_ARRAYS, MARKER}
            and (MARKER not in members or not completed_shards(group).any()))


def update_attrs(group, **values: Any) -> None:
    """Set keys of the provenance attributes (driver only)."""
    attrs = store_attrs(group)
    attrs.update(values)
    group.attrs[ATTRS_KEY] = attrs


def completed_shards(group, read_flags: bool = False) -> np.ndarray:
    """bool [n_shards]: which shards were written whole (their ``shard_complete`` flag is 1).

    A flag is 0 (the array's fill value, which zarr does not store) or 1, so the complete shards
    are the flag objects that exist: found by listing the flag array's objects, one LIST request
    per 1000 shards on object storage where reading every flag costs one GET per shard (the
    driver asks at every start and end of a run; a million candidates are ~31k shards).
    ``read_flags`` reads every flag instead (``check-store``), as does any store that cannot list.
    """
    flags = group[MARKER]
    listed = None if read_flags else _listed_flags(flags)
    if listed is not None:
        return listed
    return np.asarray(read_arrays(group, (MARKER,))[MARKER], dtype=np.uint8) == 1


def readable_shards(group, url: str = "") -> np.ndarray:
    """bool [n_shards]: the shards the readers return rows of, the complete ones (a shard left
    incomplete may hold ``passed`` but not its image). Logs a warning naming the store and how many
    shards are skipped, so nothing is dropped silently."""
    done = completed_shards(group)
    if not done.all():
        logger.warning("%s: %d of %d shard(s) incomplete, their rows not read (re-run synthesis to finish "
                       "them; check-store lists them)", url, int((~done).sum()), len(done))
    return done


def complete_rows(group, url: str = "") -> np.ndarray:
    """bool [rows]: whether each row lies in a shard :func:`readable_shards` returns; every row of
    a store of the user's own without completion flags (only image, label and passed: written
    whole by its maker, which the engine cannot check)."""
    rows, shard_size = group["passed"].shape[0], int(group["passed"].chunks[0])
    if MARKER not in group:
        return np.ones(rows, dtype=bool)
    return readable_shards(group, url)[np.arange(rows) // shard_size]


def _listed_flags(flags) -> np.ndarray | None:
    """Which flags of the 1-d, one-per-chunk, zero-filled v3 array ``flags`` have an object,
    from one listing of its objects; None where that does not say it (another layout, a store
    that cannot list)."""
    from zarr.core.sync import sync

    meta, store, path = flags.metadata, flags.store_path.store, flags.store_path.path
    if (getattr(meta, "zarr_format", None) != 3 or len(flags.shape) != 1 or tuple(flags.chunks) != (1,)
            or flags.fill_value != 0 or not store.supports_listing):
        return None
    prefix = f"{path}/" if path else ""
    keys = {prefix + meta.encode_chunk_key((i,)): i for i in range(flags.shape[0])}
    fs = getattr(store, "fs", None)  # an fsspec store: its cached listings could predate other writers'
    if fs is not None and hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()

    async def listing():
        return [key async for key in store.list_prefix(prefix)]

    done = np.zeros(flags.shape[0], dtype=bool)
    for key in sync(listing()):
        if key in keys:
            done[keys[key]] = True
    return done


class _ShardEncoder:
    """One array's write unit (its shard object, or its chunk where the array is not sharded) for
    rows ``start..start + shard_size``, encoded in the calling thread by the array's own codecs, byte
    for byte what ``array[start:stop] = value`` stores: the same codec calls in the same order, the
    same empty-chunk rule (``write_empty_chunks``), the same shard layout (morton order, index) and
    the same padding of a last, partial unit with the fill value. Built only where every codec
    encodes synchronously (zarr's own bytes, crc32c, zstd, blosc, gzip, transpose, vlen codecs);
    :meth:`supports` says so, else the writer goes through plain zarr for that array. The store's
    own arrays (as :func:`create_store` makes them) take a vectorized path to the same bytes
    (:class:`_RowShards`, :class:`_WholeChunk`), any other through zarr's codec objects.

    Why not ``array[start:stop] = value``: zarr's write path costs about 4x the encoding itself here
    (32 shards of 16 96x96 candidates: 1.1 s vs 0.26 s locally), scheduling coroutines per inner
    chunk and hopping to a worker thread for each compressor call, and for a sharded array it first
    tries to read the existing shard (one extra GET per array and shard on object storage).
    """

    def __init__(self, array):
        from zarr.core.buffer import default_buffer_prototype

        self.array = array.async_array
        self.metadata = self.array.metadata
        self.unit = tuple(self.metadata.chunk_grid.chunk_shape)  # the shard shape where sharded
        self.prototype = default_buffer_prototype()
        self.dtype = self.metadata.data_type.to_native_dtype()
        self.spec = self.metadata.get_chunk_spec((0,) * len(self.unit), self.array.config, self.prototype)
        # the vectorized encoding of the store's own arrays, None for other codecs
        self.direct = _RowShards.of(self.array, self.spec) or _WholeChunk.of(self.array, self.spec)

    @staticmethod
    def supports(array, shard_size: int) -> bool:
        """Whether ``array`` (a v3 array whose write unit spans its whole rows of one store shard)
        has only codecs this encoder runs."""
        from zarr.core.chunk_grids import RegularChunkGrid

        meta = array.metadata
        if getattr(meta, "zarr_format", None) != 3 or not isinstance(meta.chunk_grid, RegularChunkGrid):
            return False
        if tuple(meta.chunk_grid.chunk_shape) != (shard_size, *meta.shape[1:]):
            return False
        return _pipeline_is_sync(array.async_array.codec_pipeline)

    def key(self, unit: int) -> str:
        return self.metadata.encode_chunk_key((unit,) + (0,) * (len(self.unit) - 1))

    def parts(self, value: np.ndarray) -> list | None:
        """:meth:`encode` as the byte buffers that follow each other in the object (a shard of the
        store's image arrays: its rows as views of ``value``, nothing copied), for a writer that
        writes them one after the other."""
        if isinstance(self.direct, _RowShards) and value.dtype == self.dtype:
            return self.direct.parts(value)
        data = self.encode(value)
        return None if data is None else [data.as_buffer_like()]

    def encode(self, value: np.ndarray):
        """The unit's object (a zarr ``Buffer``), or None where zarr stores nothing (all fill value)."""
        from zarr.core.codec_pipeline import fill_value_or_default

        if value.dtype != self.dtype:
            value = value.astype(self.dtype, order="A")
        if self.direct is not None:
            return self.direct.encode(value)
        spec = self.spec
        if value.shape == spec.shape:
            chunk = self.prototype.nd_buffer.from_ndarray_like(value)
        else:  # the store's last, partial shard: padded with the fill value, as zarr does
            chunk = self.prototype.nd_buffer.create(shape=spec.shape, dtype=self.dtype, order=spec.order,
                                                    fill_value=fill_value_or_default(spec))
            chunk[tuple(slice(0, n) for n in value.shape)] = self.prototype.nd_buffer.from_ndarray_like(value)
        return _encode_chunk(self.array.codec_pipeline, chunk, spec)


def _pipeline_is_sync(pipeline) -> bool:
    from zarr.codecs.sharding import ShardingCodec

    for codec in pipeline:
        if isinstance(codec, ShardingCodec):
            from zarr.core.codec_pipeline import BatchedCodecPipeline

            if not (_pipeline_is_sync(codec.codec_pipeline)
                    and _pipeline_is_sync(BatchedCodecPipeline.from_codecs(codec.index_codecs))):
                return False
        elif not callable(getattr(codec, "_encode_sync", None)):
            return False
    return True


def _all_fill(chunk, fill) -> bool:
    """``chunk.all_equal(fill)`` (zarr's test of a chunk it does not store), without its broadcast
    copy for the common case of a numeric chunk and a +0 fill value: every byte zero (zarr compares
    float zeros by bit pattern, so -0.0 is stored, as here)."""
    data = chunk.as_ndarray_like()
    if (isinstance(data, np.ndarray) and data.dtype.kind in "biuf" and data.dtype.itemsize in (1, 2, 4, 8)
            and np.asarray(fill).dtype.kind in "biuf" and fill == 0 and not np.signbit(fill)):
        return not np.ascontiguousarray(data).view(f"u{data.dtype.itemsize}").any()
    if isinstance(data, np.ndarray) and data.dtype == object and isinstance(fill, str):  # text: no broadcast copy
        return all(isinstance(v, str) and v == fill for v in data.flat)
    return chunk.all_equal(fill)


def _encode_chunk(pipeline, chunk, spec):
    """zarr's ``BatchedCodecPipeline.write_batch`` for one complete chunk, synchronously."""
    from zarr.codecs.sharding import ShardingCodec
    from zarr.core.codec_pipeline import fill_value_or_default

    if not spec.config.write_empty_chunks and _all_fill(chunk, fill_value_or_default(spec)):
        return None
    data = chunk
    for codec in pipeline.array_array_codecs:
        data = codec._encode_sync(data, spec)
        spec = codec.resolve_metadata(spec)
    codec = pipeline.array_bytes_codec
    data = _encode_shard(codec, data, spec) if isinstance(codec, ShardingCodec) else codec._encode_sync(data, spec)
    if data is None:
        return None
    spec = codec.resolve_metadata(spec)
    for codec in pipeline.bytes_bytes_codecs:
        data = codec._encode_sync(data, spec)
        spec = codec.resolve_metadata(spec)
    return data


@functools.lru_cache(maxsize=32)
def _index_pipeline(index_codecs: tuple):
    """A sharding codec's index pipeline (built once per distinct index codecs, where zarr builds
    it per shard; bounded, as every writer opens its arrays anew)."""
    from zarr.core.codec_pipeline import BatchedCodecPipeline

    return BatchedCodecPipeline.from_codecs(index_codecs)


def _encode_shard(codec, shard, shard_spec):
    """zarr's ``ShardingCodec._encode_single`` (inner chunks in morton order, then the index),
    synchronously; None where every inner chunk is empty."""
    from zarr.codecs.sharding import ShardingCodecIndexLocation, _ShardIndex
    from zarr.core.indexing import morton_order_iter

    chunk_spec = codec._get_chunk_spec(shard_spec)
    per_shard = codec._get_chunks_per_shard(shard_spec)
    inner = codec.codec_pipeline
    index = _ShardIndex.create_empty(per_shard)
    buffers, offset = [], 0
    for coords in morton_order_iter(per_shard):
        region = tuple(slice(c * n, (c + 1) * n) for c, n in zip(coords, codec.chunk_shape, strict=True))
        data = _encode_chunk(inner, shard[region], chunk_spec)
        if data is None or len(data) == 0:
            continue
        buffers.append(data)
        index.set_chunk_slice(coords, slice(offset, offset + len(data)))
        offset += len(data)
    if not buffers:
        return None
    index_pipeline = _index_pipeline(tuple(codec.index_codecs))
    index_spec = codec._get_index_chunk_spec(per_shard)

    def index_bytes():
        data, spec = index_spec.prototype.nd_buffer.from_numpy_array(index.offsets_and_lengths), index_spec
        for index_codec in index_pipeline:
            data = index_codec._encode_sync(data, spec)
            spec = index_codec.resolve_metadata(spec)
        return data

    if codec.index_location == ShardingCodecIndexLocation.start:
        stored = index.offsets_and_lengths[..., 0] != 2**64 - 1
        index.offsets_and_lengths[stored, 0] += len(index_bytes())
        buffers.insert(0, index_bytes())
    else:
        buffers.append(index_bytes())
    return shard_spec.prototype.buffer.create_zero_length().combine(buffers)


def _numcodecs_of(codecs) -> tuple | None:
    """The numcodecs objects zarr's bytes-to-bytes ``codecs`` (blosc, zstd, gzip) call, in order;
    None where one is of another kind."""
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    attribute = {BloscCodec: "_blosc_codec", ZstdCodec: "_zstd_codec", GzipCodec: "_gzip_codec"}
    found = tuple(getattr(codec, attribute.get(type(codec), ""), None) for codec in codecs)
    return None if any(c is None for c in found) else found  # (private to zarr: a version without them is encoded by zarr)


def _raw_dtype(codec, spec) -> np.dtype | None:
    """The dtype whose memory is what zarr's ``bytes`` ``codec`` stores of a chunk of ``spec`` (its
    byte order), where the fill value is all zero bits (an all-fill chunk: one of zero bytes; zarr
    compares by bit pattern, so -0.0 is stored); None for any other codec or fill value."""
    from zarr.codecs import BytesCodec
    from zarr.codecs.bytes import Endian
    from zarr.core.codec_pipeline import fill_value_or_default

    if type(codec) is not BytesCodec:
        return None
    dtype = np.dtype(spec.dtype.to_native_dtype())
    fill = fill_value_or_default(spec)
    if (dtype.kind not in "biuf" or dtype.itemsize not in (1, 2, 4, 8) or np.asarray(fill).dtype.kind not in "biuf"
            or fill != 0 or np.signbit(fill)):
        return None
    if dtype.itemsize > 1 and codec.endian is not None:
        dtype = dtype.newbyteorder("<" if codec.endian == Endian.little else ">")
    return dtype


def _compress(data: np.ndarray, compressors: tuple) -> np.ndarray:
    """``data`` (bytes as uint8, as zarr hands them to its compressors) through each compressor."""
    for compressor in compressors:
        data = np.frombuffer(compressor.encode(data), np.uint8)
    return data


class _RowShards:
    """:func:`_encode_chunk` of a shard, vectorized, for the store's image arrays: inner chunks of
    one row each (chunks per shard ``(n, 1, ...)``, in morton order), each its raw bytes (zarr's
    ``bytes`` codec, fill value zero) then compressed by zarr's numcodecs-backed codecs (the same
    numcodecs objects, on the same bytes), the index zarr's default (``bytes`` little endian, then
    ``crc32c``, at the end). zarr's codec objects cost ~35 us per inner chunk in buffer wrappers and
    fill-value tests, ~5x the LZ4 compression of a 96x96 mask itself. :meth:`of` says whether an
    array is such; any other goes through :func:`_encode_chunk`.
    """

    def __init__(self, order: np.ndarray, dtype: np.dtype, compressors: tuple, prototype):
        self.order = order  # the inner chunks' rows, in the order their bytes follow each other
        self.dtype = dtype
        self.compressors = compressors
        self.prototype = prototype

    @classmethod
    def of(cls, array, spec) -> _RowShards | None:
        """The encoder of ``array``'s shards (``spec``: a shard's), None unless its codecs and fill
        value are those this class reproduces."""
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
        from zarr.codecs.bytes import Endian
        from zarr.codecs.sharding import ShardingCodecIndexLocation
        from zarr.core.indexing import morton_order_iter

        pipeline = array.codec_pipeline
        codec = pipeline.array_bytes_codec
        if (pipeline.array_array_codecs or pipeline.bytes_bytes_codecs or not isinstance(codec, ShardingCodec)
                or spec.config.write_empty_chunks or tuple(codec.chunk_shape) != (1, *spec.shape[1:])
                or codec.index_location != ShardingCodecIndexLocation.end):
            return None
        index = tuple(codec.index_codecs)
        if not (len(index) == 2 and type(index[0]) is BytesCodec and index[0].endian == Endian.little
                and type(index[1]) is Crc32cCodec):
            return None
        inner = codec.codec_pipeline
        dtype, compressors = _raw_dtype(inner.array_bytes_codec, spec), _numcodecs_of(inner.bytes_bytes_codecs)
        if inner.array_array_codecs or dtype is None or compressors is None:
            return None
        order = np.array([coords[0] for coords in morton_order_iter(codec._get_chunks_per_shard(spec))], np.intp)
        return cls(order, dtype, compressors, spec.prototype)

    def parts(self, value: np.ndarray) -> list | None:
        """The shard object of ``value`` as the byte buffers that follow each other in it (rows
        stored raw are views of ``value``: nothing copied), None where every row is all zero bits.
        ``value`` may hold fewer rows than a shard (a store's last): zarr pads with the fill value,
        chunks it leaves out."""
        import google_crc32c

        count = len(value)
        flat = np.ascontiguousarray(value, dtype=self.dtype).reshape(count, int(np.prod(value.shape[1:])))
        kept = np.zeros(len(self.order), bool)
        kept[:count] = _nonzero_rows(flat)
        rows = self.order[kept[self.order]]
        if not len(rows):
            return None
        raw = flat.view(np.uint8)
        if self.compressors:
            parts = [_compress(raw[row], self.compressors) for row in rows]
            lengths = np.array([len(part) for part in parts], np.uint64)
        else:  # consecutive rows as one view each
            runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
            parts = [raw[run[0]:run[-1] + 1] for run in runs]
            lengths = np.full(len(rows), raw.shape[1], np.uint64)
        index = np.full((len(self.order), 2), 2**64 - 1, np.uint64)
        index[rows, 0] = np.cumsum(lengths) - lengths
        index[rows, 1] = lengths
        index_bytes = index.astype("<u8").tobytes()
        checksum = np.array([google_crc32c.value(index_bytes)], np.uint32).tobytes()  # native order, as zarr's
        return [*parts, index_bytes, checksum]

    def encode(self, value: np.ndarray):
        """The shard object of ``value`` (a zarr ``Buffer``), None where every row is all zero bits."""
        parts = self.parts(value)
        return None if parts is None else self.prototype.buffer.from_bytes(b"".join(parts))


def _nonzero_rows(flat: np.ndarray) -> np.ndarray:
    """bool per row of the 2-d ``flat``: whether any of its bits is set (zarr's test of an inner
    chunk it stores, fill value zero). A row found set at a few sampled positions is not read
    further (an image is rarely zero there); only the others are read whole."""
    width = next(n for n in (8, 4, 2, 1) if flat.shape[1] * flat.dtype.itemsize % n == 0)
    bits = flat.view(np.uint8).view(f"u{width}")  # the widest words a row splits into: fewer to test
    kept = bits[:, ::max(1, bits.shape[1] // 64)].any(axis=1)
    unsure = np.flatnonzero(~kept)
    if len(unsure):
        kept[unsure] = bits[unsure].any(axis=1)
    return kept


class _WholeChunk:
    """:func:`_encode_chunk` for the store's row, text and marker arrays (one chunk a unit, not
    sharded): the chunk's raw bytes (zarr's ``bytes`` codec, fill value zero) or its ``vlen-utf8``
    encoding, compressed by zarr's numcodecs-backed codecs (the same numcodecs objects, on the same
    bytes). zarr's codec objects and fill-value test cost ~30 us a chunk, as much as compressing it.
    :meth:`of` says whether an array is such; any other goes through :func:`_encode_chunk`.
    """

    def __init__(self, spec, dtype: np.dtype | None, compressors: tuple):
        from numcodecs import VLenUTF8

        self.spec = spec
        self.dtype = dtype  # None: text, encoded by vlen-utf8
        self.compressors = compressors
        self.text = VLenUTF8() if dtype is None else None

    @classmethod
    def of(cls, array, spec) -> _WholeChunk | None:
        """The encoder of ``array``'s chunks (``spec``: a chunk's), None unless its codecs and fill
        value are those this class reproduces."""
        from zarr.codecs import VLenUTF8Codec
        from zarr.core.codec_pipeline import fill_value_or_default

        pipeline = array.codec_pipeline
        compressors = _numcodecs_of(pipeline.bytes_bytes_codecs)
        if pipeline.array_array_codecs or compressors is None or spec.config.write_empty_chunks:
            return None
        if type(pipeline.array_bytes_codec) is VLenUTF8Codec and isinstance(fill_value_or_default(spec), str):
            return cls(spec, None, compressors)
        dtype = _raw_dtype(pipeline.array_bytes_codec, spec)
        return None if dtype is None else cls(spec, dtype, compressors)

    def encode(self, value: np.ndarray):
        """The chunk object of ``value`` (in the array's dtype; a store's last shard may hold fewer
        rows than a chunk: padded with the fill value, as zarr does), None where all of it is the
        fill value."""
        from zarr.core.codec_pipeline import fill_value_or_default

        spec = self.spec
        fill = fill_value_or_default(spec)
        if value.shape != spec.shape:
            padded = np.full(spec.shape, fill, dtype=value.dtype)
            padded[:len(value)] = value
            value = padded
        if self.text is not None:
            if (value == fill).all():
                return None
            data = np.frombuffer(self.text.encode(value), np.uint8)
        else:
            flat = np.ascontiguousarray(value, dtype=self.dtype).reshape(-1)
            if not flat.view(f"u{flat.dtype.itemsize}").any():
                return None
            data = flat.view(np.uint8)
        return spec.prototype.buffer.from_bytes(_compress(data, self.compressors))


def _zarr_loop():
    """zarr's IO event loop (the one its synchronous API runs coroutines on, in its own thread)."""
    from zarr.core.sync import _get_loop

    return _get_loop()


async def _put(items, then=None) -> None:
    """Each ``(store_path, buffer)`` in one put (concurrently); a None buffer deletes the object, as
    zarr does for a unit that holds only the fill value. ``then``, one more such item, is put only
    once all of ``items`` are stored (a shard's completion marker)."""
    import asyncio

    await asyncio.gather(*(path.set(data) if data is not None else path.delete() for path, data in items))
    if then is not None:
        await _put([then])


def _local_folders(arrays: Mapping[str, Any]) -> dict[str, str] | None:
    """``{name: folder of the array's objects}`` where every array is in a writable zarr
    ``LocalStore`` (its very class: a subclass may do more on a put), written with
    :func:`_write_local`; None for any other store (object storage, memory, fsspec), written
    through zarr's IO loop."""
    from zarr.storage import LocalStore

    stores = [array.store_path.store for array in arrays.values()]
    if not all(type(store) is LocalStore and not store.read_only for store in stores):
        return None
    return {name: os.path.join(array.store_path.store.root, array.store_path.path) for name, array in arrays.items()}


def _write_local(path: str, parts) -> None:
    """zarr's ``LocalStore.set`` of the file ``path`` (``delete`` where ``parts`` is None), in the
    calling thread: ``parts``, the object's bytes as buffers that follow each other, written to a
    temporary file beside it with one gathering write (no joined copy), then renamed over it (a
    reader never sees half an object), its folder made only where it is missing. zarr's own put
    hops to a worker thread and makes the folder every time: ~8x the cost of the write itself here
    (the 384 objects of 32 shards of 16 96x96 candidates: ~0.17 s vs ~0.02 s)."""
    if parts is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    partial = f"{path}.{uuid.uuid4().hex}.partial"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(partial, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(partial, flags, 0o666)
    try:
        try:
            _write_all(fd, parts)
        finally:
            os.close(fd)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


_IOV_MAX = 1024  # buffers one writev takes at most (POSIX guarantees 16; Linux and macOS take 1024)


def _write_all(fd: int, parts) -> None:
    """Every byte of ``parts`` (buffers, in order) to ``fd``: ``os.writev`` where there is one,
    again from where it stopped until all is written."""
    views = [view for view in (memoryview(part).cast("B") for part in parts) if len(view)]
    gather = getattr(os, "writev", None)
    first = 0
    while first < len(views):
        written = gather(fd, views[first:first + _IOV_MAX]) if gather else os.write(fd, views[first])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


def _open_arrays(group, names: tuple[str, ...]) -> dict[str, Any]:
    """``{name: group[name]}``, the metadata documents read concurrently (one round trip on object
    storage instead of one per array)."""
    import asyncio

    import zarr
    from zarr.core.sync import sync

    async_group = getattr(group, "_async_group", None)
    if async_group is None:
        return {name: group[name] for name in names}

    async def open_all():
        return await asyncio.gather(*(async_group.getitem(name) for name in names))

    arrays = dict(zip(names, sync(open_all()), strict=True))
    for name, node in arrays.items():
        if not isinstance(node, zarr.AsyncArray):
            raise ValueError(f"{group.store_path}: {name!r} is not an array")
    return {name: zarr.Array(node) for name, node in arrays.items()}


class ShardWriter:
    """Writes whole shards into an open store: the arrays are opened once (their metadata read
    concurrently); each array's shard object is encoded in the calling thread with the array's own codecs (the
    bytes zarr would write, see :class:`_ShardEncoder`), all of a shard's objects are put
    concurrently, one put each (in a local folder: written one after the other in the calling
    thread, see :func:`_write_local`), and its completion flag is put only once they all are stored.

    Args:
        group: the store's root group, opened for writing.
        layout: the store's layout (read from ``group`` when omitted).
    """

    NAMES = (*IMAGE_ARRAYS, *ROW_ARRAYS, *TEXT_ARRAYS)

    def __init__(self, group, layout: StoreLayout | None = None):
        arrays = _open_arrays(group, (*self.NAMES, MARKER))
        self.marker = arrays.pop(MARKER)
        self.arrays = arrays
        n, h, w = self.arrays["image"].shape
        self.layout = layout or StoreLayout(int(n), int(h), int(w), int(self.arrays["dice"].chunks[0]))
        size = self.layout.shard_size
        self.encoders = {name: _ShardEncoder(array) for name, array in self.arrays.items()
                         if _ShardEncoder.supports(array, size)}
        self.marker_encoder = _ShardEncoder(self.marker) if _ShardEncoder.supports(self.marker, 1) else None
        # every shard's flag is the same object: 1 in a chunk of one
        self.marker_object = self.marker_encoder.encode(np.ones(1, np.uint8)) if self.marker_encoder else None
        self.folders = _local_folders({**self.arrays, MARKER: self.marker})

    def write(self, shard: int, rows: Mapping[str, Any]) -> int:
        """Write every row of ``shard`` (the caller is its only writer), then mark it complete.

        Args:
            shard: shard index.
            rows: one entry per array of the schema (except the marker), each with exactly the
                shard's row count along the first axis.

        Returns:
            the number of rows written.
        """
        import asyncio
        from concurrent.futures import wait

        from zarr.core.sync import sync

        start, stop = self.layout.shard_rows(shard)
        count = stop - start
        values = {}
        for name in self.NAMES:
            if name not in rows:
                raise ValueError(f"shard {shard}: no {name!r} rows to write")
            value = np.asarray(rows[name])
            if value.shape[:1] != (count,):
                raise ValueError(f"shard {shard}: {name!r} has {value.shape[:1]} rows, the shard holds {count}")
            if value.shape[1:] != self.arrays[name].shape[1:]:
                raise ValueError(f"shard {shard}: {name!r} rows are {value.shape[1:]}, the store's "
                                 f"{self.arrays[name].shape[1:]}")
            values[name] = np.asarray([str(v) for v in value], dtype=object) if name in TEXT_ARRAYS else value
        # Every object encoded here first, then all of them put concurrently in one submission to
        # zarr's IO loop (waking that loop costs more than a small local write, once per object), or,
        # in a local folder, written one after the other in this thread (a write there costs less
        # than waking a thread); arrays with codecs the encoder does not run go through plain zarr
        # (still one put per shard object). Encoding is a small part of a put to object storage at
        # "fast" compression.
        loop = _zarr_loop()
        pending = [asyncio.run_coroutine_threadsafe(self.arrays[name].async_array.setitem(slice(start, stop), value),
                                                    loop)
                   for name, value in values.items() if name not in self.encoders]
        marked = False
        try:
            if self.folders is not None:  # each object written as it is encoded, from its parts
                for name, encoder in self.encoders.items():
                    _write_local(f"{self.folders[name]}/{encoder.key(shard)}", encoder.parts(values[name]))
            else:
                items = [(name, encoder.key(shard), encoder.encode(values[name]))
                         for name, encoder in self.encoders.items()]
                marker = None
                # the common case: the marker in the same submission (apart where a test holds the
                # writer between the two: engine.failpoints)
                if not pending and self.marker_encoder is not None and not failpoints.armed("store.shard_complete"):
                    marker = (self.marker.store_path / self.marker_encoder.key(shard), self.marker_object)
                pending.append(asyncio.run_coroutine_threadsafe(
                    _put([(self.arrays[name].store_path / key, data) for name, key, data in items], then=marker), loop))
                marked = marker is not None
        finally:
            wait(pending)  # nothing of this shard is in flight once write returns or raises
        for future in pending:
            future.result()
        # last: a shard counts only once all of it is stored
        if marked:
            return count
        failpoints.reach("store.shard_complete", shard=shard)
        if self.marker_encoder is None:
            self.marker[shard] = 1
        elif self.folders is not None:
            _write_local(f"{self.folders[MARKER]}/{self.marker_encoder.key(shard)}",
                         [self.marker_object.as_buffer_like()])
        else:
            sync(_put([(self.marker.store_path / self.marker_encoder.key(shard), self.marker_object)]))
        return count

    def close(self) -> None:
        """Nothing to release (kept for the writers' ``try``/``finally``)."""


def write_shard(group, shard: int, rows: Mapping[str, Any], layout: StoreLayout | None = None) -> int:
    """Write one whole shard and mark it complete (:class:`ShardWriter` for many shards)."""
    writer = ShardWriter(group, layout)
    try:
        return writer.write(shard, rows)
    finally:
        writer.close()


class ShardReader:
    """Reads whole shards, or single rows, of an open store: the arrays are opened once (their
    metadata read concurrently), and every array of a shard or row is fetched concurrently in one
    submission to zarr's IO loop: on object storage one round trip's latency for all of them, where
    ``group[name][start:stop]`` array after array pays one per array and one more per opening.
    :meth:`iter_shards` keeps several shards in flight (the next ones fetched while the caller works
    on the current one), holding at most that many in memory.

    Args:
        group: the store's root group.
        names: the arrays to read (default every array of the schema but the marker).
        layout: the store's layout (read from ``group`` when omitted).
    """

    def __init__(self, group, names: tuple[str, ...] | None = None, layout: StoreLayout | None = None):
        names = tuple(names or (*IMAGE_ARRAYS, *ROW_ARRAYS, *TEXT_ARRAYS))
        self.arrays = {name: array.async_array for name, array in _open_arrays(group, names).items()}
        self._group, self._layout = group, layout

    @property
    def layout(self) -> StoreLayout:
        """The store's layout (read from the group on first use: :meth:`select` needs none)."""
        if self._layout is None:
            self._layout = StoreLayout.of_group(self._group)
        return self._layout

    async def _get(self, selection) -> dict[str, np.ndarray]:
        import asyncio

        values = await asyncio.gather(*(array.getitem(selection) for array in self.arrays.values()))
        return {name: np.asarray(value) for name, value in zip(self.arrays, values, strict=True)}

    def _submit(self, selection):
        """A concurrent future of ``{name: array[selection]}`` (several: a list of such dicts)."""
        import asyncio

        async def get_many(selections):
            return list(await asyncio.gather(*(self._get(one) for one in selections)))

        coroutine = get_many(selection) if isinstance(selection, list) else self._get(selection)
        return asyncio.run_coroutine_threadsafe(coroutine, _zarr_loop())

    def select(self, selection) -> dict[str, np.ndarray]:
        """``array[selection]`` of every array (a basic selection: an int, a slice), fetched at once
        (up to :data:`READ_CONCURRENCY` chunk reads in flight per array: a whole row array of a
        large store is one chunk per shard)."""
        import zarr

        with zarr.config.set({"async.concurrency": max(READ_CONCURRENCY, zarr.config.get("async.concurrency"))}):
            return self._submit(selection).result()

    def read(self, shard: int) -> dict[str, np.ndarray]:
        """Every row of ``shard``, one array per name."""
        return self.select(slice(*self.layout.shard_rows(shard)))

    def row(self, index: int) -> dict[str, Any]:
        """Row ``index`` of every array (0-d for the row arrays, [H, W] for images)."""
        return self.select(int(index))

    def rows(self, indices) -> list[dict[str, Any]]:
        """:meth:`row` of each of ``indices``, every array of every row fetched at once (a batch of
        samples in one round trip's latency, not one per sample)."""
        return self._submit([int(i) for i in indices]).result()

    def iter_shards(self, shards, ahead: int = 8) -> Iterator[tuple[int, dict[str, np.ndarray] | Exception]]:
        """``(shard, rows)`` for each of ``shards`` in order, up to ``ahead`` of them fetched at once;
        a shard that cannot be read yields its exception instead of its rows (the others go on)."""
        from collections import deque

        shards, pending = iter(shards), deque()
        for shard in shards:
            pending.append((shard, self._submit(slice(*self.layout.shard_rows(shard)))))
            if len(pending) >= max(1, ahead):
                break
        while pending:
            shard, future = pending.popleft()
            nxt = next(shards, None)
            if nxt is not None:
                pending.append((nxt, self._submit(slice(*self.layout.shard_rows(nxt)))))
            try:
                yield shard, future.result()
            except Exception as exc:  # noqa: BLE001 - the caller names the shard and the reason
                yield shard, exc


def read_arrays(group, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Whole arrays ``names`` of an open store (its row arrays: ``passed``, ``dice``, texts), all
    fetched at once with :data:`READ_CONCURRENCY` chunk reads in flight per array: on object
    storage a row array of a million candidates is ~31k chunks, one per shard."""
    return ShardReader(group, tuple(names)).select(slice(None))


def _text(values: np.ndarray) -> list[str]:
    return [str(v) for v in values]


def dice_above(dice, threshold: float) -> np.ndarray:
    """``dice > threshold`` as the filter decides it, on the Dice as stored (float32): an exact Dice
    of 0.6 = 2*3/10 is stored as 0.6000000238, which a float64 comparison would pass. The filter,
    ``check-store`` and the selection by Dice all compare through this."""
    return np.asarray(dice, dtype=np.float32) > np.float32(threshold)


def select_samples(group, min_dice: float, url: str = "") -> np.ndarray:
    """Row indices of the samples of an open store whose image is present and whose Dice > ``min_dice``,
    in complete shards only (:func:`complete_rows`).

    A stricter ``min_dice`` than the store's filter threshold is a subset of the samples that
    passed; a looser one reaches rejected candidates, whose images exist only in a store written
    with ``keep_rejected`` (then: every generated candidate of a complete shard). Dice is compared
    in float32, as the filter compared it, so ``min_dice`` equal to the store's threshold selects
    exactly the samples that passed.

    Raises:
        ValueError: the store records no filter threshold or Dice, or ``min_dice`` is below its
            threshold and it kept no rejected images (the store and both thresholds named).
    """
    config = store_attrs(group).get("config", {})
    threshold = config.get("threshold")
    if threshold is None or "dice" not in group:
        raise ValueError(f"{url}: the store records no filter threshold or no Dice; it cannot be selected by Dice")
    keep_rejected = bool(config.get("keep_rejected", False))
    if min_dice < float(threshold) and not keep_rejected:
        raise ValueError(
            f"{url}: asked for samples with Dice > {min_dice}, but the store was filtered at Dice > {threshold} "
            "without keep_rejected, so its rejected candidates have no image; write a store with "
            "synthesis.keep_rejected=true for a threshold below the store's own")
    rejected_too = keep_rejected and min_dice < float(threshold)
    rows = read_arrays(group, ("passed", "dice", *(("skip_reason",) if rejected_too else ())))
    present = np.asarray(rows["passed"], dtype=bool)
    if rejected_too:
        present = np.asarray([not str(r) for r in rows["skip_reason"]], bool)  # every made candidate
    return np.flatnonzero(present & complete_rows(group, url) & dice_above(rows["dice"], min_dice))


def _synthetic_selection(url: str, passed_only: bool, storage_options: dict | None, min_dice: float | None):
    """``(group, keep, passed)``: the open store, the sorted row indices :func:`read_synthetic_arrays`
    returns (of complete shards only) and the ``passed`` flag of every row (all true under ``min_dice``)."""
    if min_dice is not None and not passed_only:
        raise ValueError("min_dice selects the samples that pass a filter: it cannot go with passed_only=False")
    group = open_store(url, "r", storage_options)
    missing = [name for name in REQUIRED if name not in group]
    if missing:
        raise ValueError(f"{url}: not a synthetic store, missing arrays {missing}")
    if min_dice is not None:  # select_samples reads passed itself
        return group, select_samples(group, float(min_dice), url), np.ones(group["passed"].shape[0], dtype=bool)
    passed = np.asarray(read_arrays(group, ("passed",))["passed"], dtype=bool)
    return group, np.flatnonzero((passed if passed_only else True) & complete_rows(group, url)), passed


def synthetic_rows(url: str, passed_only: bool = True, storage_options: dict | None = None,
                   min_dice: float | None = None) -> np.ndarray:
    """The store rows :func:`read_synthetic_arrays` would return (sorted), from the row arrays
    alone (no image read): to draw a subset first and read only its images (``rows=``)."""
    return _synthetic_selection(url, passed_only, storage_options, min_dice)[1]


def read_synthetic_arrays(url: str, passed_only: bool = True, storage_options: dict | None = None,
                          min_dice: float | None = None, rows: np.ndarray | None = None) -> dict[str, Any]:
    """The store's samples as numpy arrays for downstream training.

    Args:
        url: the store's path or fsspec URL.
        passed_only: keep only samples that passed the quality filter (the default: rejected
            candidates never train a downstream model). Either way only rows of complete shards
            are returned (:func:`readable_shards`).
        storage_options: fsspec options (endpoint and the like; never credentials in configs).
        min_dice: instead of the filter's decision, keep the samples with Dice > ``min_dice``
            (:func:`select_samples`: below the store's own threshold only for a store written with
            ``keep_rejected``); their ``passed`` is then true: they pass this filter.
        rows: only these store rows (each one of those selected above, see :func:`synthetic_rows`),
            in ascending order; only their images are read. Default: all selected.

    Returns:
        ``image`` float32 [M, 1, H, W] in [0, 1], ``label`` uint8 [M, H, W], ``passed`` bool [M], and
        ``sample_id`` / ``dice`` / ``caption`` / ``source`` where the store has them.

    Raises:
        ValueError: not a synthetic store, or ``rows`` holds a row the selection does not (named).
    """
    group, keep, passed = _synthetic_selection(url, passed_only, storage_options, min_dice)
    if rows is not None:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        outside = rows[~np.isin(rows, keep)]
        if len(outside):
            selected = f"Dice > {min_dice}" if min_dice is not None else "passed" if passed_only else "all"
            raise ValueError(f"{url}: rows {outside[:5].tolist()} are not among the selected samples ({selected})")
        keep = rows
    out: dict[str, Any] = {
        "image": np.asarray(group["image"].oindex[keep], dtype=np.float32)[:, None],
        "label": np.asarray(group["label"].oindex[keep], dtype=np.uint8),
        "passed": passed[keep],
    }
    names = tuple(name for name in ("sample_id", "dice", "caption", "source") if name in group)
    for name, values in (read_arrays(group, names) if names else {}).items():
        out[name] = values[keep].astype(np.float32) if name == "dice" else _text(values[keep])
    image = out["image"]
    if image.size and (not np.isfinite(image).all() or image.min() < 0 or image.max() > 1):
        raise ValueError(f"{url}: image values must be finite and in [0, 1]")
    return out


SAMPLE_ARRAYS = ("image", "label", "condition", "dice", "passed", "caption", "source", "sample_id")


def _sample(row: Mapping[str, Any]) -> dict[str, Any]:
    """A sample dict of one row of :data:`SAMPLE_ARRAYS` (as :meth:`ShardReader.row` reads it)."""
    return {
        "image": np.asarray(row["image"], np.float32)[None],
        "label": np.asarray(row["label"], np.uint8)[None],
        "condition": np.asarray(row["condition"], np.uint8)[None],
        "dice": float(row["dice"]),
        "passed": bool(row["passed"]),
        "caption": str(row["caption"]),
        "source": str(row["source"]),
        "sample_id": str(row["sample_id"]),
    }


class SyntheticDataset:
    """The store as a MONAI-style map dataset: ``dataset[i]`` is a dict with ``image`` float32 and
    ``label`` / ``condition`` uint8, channel-first [1, H, W], plus ``caption``, ``dice``, ``passed``,
    ``source`` and ``sample_id``; an optional MONAI ``transform`` (e.g. ``Compose([...])`` of
    dictionary transforms) is applied to each sample.

    Only passed samples by default, and only those of complete shards. Reading is lazy (one
    sample's chunk per item, its arrays fetched concurrently; a DataLoader's batch fetched all at
    once through ``__getitems__``), so the store may be much larger than memory; the store is
    reopened in each DataLoader worker process (spawned or forked).

    Example:
        >>> ds = SyntheticDataset("runs/demo/synthetic.zarr")  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)  # doctest: +SKIP
    """

    def __init__(self, url: str, passed_only: bool = True, transform=None,
                 storage_options: Mapping[str, Any] | None = None):
        self.url, self.transform = url, transform
        self.storage_options = dict(storage_options or {})
        group = open_store(url, "r", self.storage_options)
        missing = [name for name in (*IMAGE_ARRAYS, "passed", "sample_id") if name not in group]
        if missing:
            raise ValueError(f"{url}: not a synthetic store, missing arrays {missing}")
        passed = np.asarray(read_arrays(group, ("passed",))["passed"], dtype=bool)
        self.indices = np.flatnonzero((passed if passed_only else True) & complete_rows(group, url))
        self._reader: ShardReader | None = None
        self._pid = 0  # the process that opened _reader (a forked worker opens its own)

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None  # zarr arrays are reopened per process
        return state

    def _open(self) -> ShardReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = ShardReader(open_store(self.url, "r", self.storage_options), SAMPLE_ARRAYS)
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = _sample(self._open().row(int(self.indices[index])))
        return self.transform(sample) if self.transform is not None else sample

    def __getitems__(self, indices) -> list[dict[str, Any]]:
        """The samples of a whole batch, their reads all in flight at once (torch's DataLoader
        calls this with a batch's indices where a dataset has it)."""
        rows = self._open().rows([int(self.indices[i]) for i in indices])
        samples = [_sample(row) for row in rows]
        return [self.transform(s) for s in samples] if self.transform is not None else samples


def _read_shards_batch(batch: dict[str, np.ndarray], url: str, storage_options: dict | None,
                       passed_only: bool, layout: StoreLayout) -> Iterator[dict[str, Any]]:
    """Ray Data task: shard indices -> their samples as columns (``layout``: read once by the
    driver; the batch's shards read through one reader, all in flight at once). Shards that kept
    nothing yield no batch: an empty one would become a block Ray Data types as pickled objects and
    null texts, beside the other blocks' tensors and strings."""
    reader = ShardReader(open_store(url, "r", storage_options), SAMPLE_ARRAYS, layout)
    kept = []  # per shard, its kept rows of every array
    for shard, rows in reader.iter_shards([int(s) for s in batch["shard"]], ahead=len(batch["shard"])):
        if isinstance(rows, Exception):
            raise ValueError(f"{url}: shard {shard} unreadable ({type(rows).__name__}: {rows})") from rows
        keep = np.asarray(rows["passed"], bool) if passed_only else slice(None)
        kept.append({name: np.asarray(rows[name])[keep] for name in SAMPLE_ARRAYS})
    if not sum(len(rows["passed"]) for rows in kept):
        return
    columns = {name: np.concatenate([rows[name] for rows in kept]) for name in SAMPLE_ARRAYS}
    yield {  # as SyntheticDataset's samples (_sample), a column each
        "image": columns["image"][:, None].astype(np.float32), "label": columns["label"][:, None].astype(np.uint8),
        "condition": columns["condition"][:, None].astype(np.uint8), "dice": columns["dice"].astype(np.float32),
        "passed": columns["passed"].astype(bool),
        **{name: np.asarray(_text(columns[name]), dtype=object) for name in ("caption", "source", "sample_id")},
    }


def shared_filesystem(url: str) -> bool:
    """Whether Ray workers in other processes see what is written at ``url`` (``memory://`` is per process)."""
    return not str(url).startswith("memory://")


def read_store_dataset(url: str, passed_only: bool = True, storage_options: Mapping[str, Any] | None = None):
    """The store as a Ray Dataset, one row per sample (columns as :class:`SyntheticDataset`), read
    in parallel tasks, :data:`SHARDS_PER_READ_TASK` shards a call; only passed samples by default,
    and only those of complete shards (:func:`readable_shards`).
    A ``memory://`` store, which only this process sees, is read here and handed to Ray as blocks."""
    import ray

    group = open_store(url, "r", storage_options)
    layout = StoreLayout.of_group(group)
    complete = np.flatnonzero(readable_shards(group, url))
    if not shared_filesystem(url):
        from ray.data.block import BlockAccessor

        blocks = [BlockAccessor.batch_to_block(batch)
                  for start in range(0, len(complete), SHARDS_PER_READ_TASK)
                  for batch in _read_shards_batch({"shard": complete[start:start + SHARDS_PER_READ_TASK]},
                                                  url, storage_options, passed_only, layout)]
        return ray.data.from_arrow(blocks) if blocks else ray.data.from_items([])
    shards = ray.data.from_items([{"shard": int(i)} for i in complete],
                                 override_num_blocks=max(1, min(len(complete), 200)))
    return shards.map_batches(_read_shards_batch, batch_size=SHARDS_PER_READ_TASK,
                              fn_kwargs={"url": url, "storage_options": _storage_options(url, storage_options),
                                         "passed_only": passed_only, "layout": layout})
