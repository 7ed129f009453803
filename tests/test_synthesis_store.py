"""The synthesis plan, the Zarr store and check-store, through the sequential path (no Ray):
deterministic ids, one writer per shard, resumable and idempotent runs, provenance, readers."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.anatomy.labels import MYOCARDIUM, SCAR
from engine.cli import main
from engine.synthesis.check import check_store
from engine.synthesis.config import SynthesisConfig
from engine.synthesis.pipeline import SynthesisJob, synthesize
from engine.synthesis.plan import build_shard_inputs, make_plan
from engine.synthesis.store import (
    IMAGE_ARRAYS,
    MARKER,
    ROW_ARRAYS,
    TEXT_ARRAYS,
    ShardReader,
    ShardWriter,
    StoreLayout,
    SyntheticDataset,
    completed_shards,
    create_store,
    open_store,
    read_synthetic_arrays,
    select_samples,
    store_attrs,
    synthetic_rows,
    write_shard,
)
from engine.training.prepare import prepare_arrays
from tests.synth_helpers import make_tiny_run, tiny_config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def parts(base, tmp_path_factory):
    return prepare_arrays(tiny_config(base, tmp_path_factory.mktemp("parts")))[0]


@pytest.fixture(scope="module")
def done_run(base, tmp_path_factory):
    """One complete sequential run (threshold -1: every made candidate passes)."""
    run = tmp_path_factory.mktemp("done")
    cfg = tiny_config(base, run, ["synthesis.threshold=-1.0", "synthesis.max_candidates=18"])
    summary = synthesize(cfg, sequential=True, log=lambda _: None)
    return cfg, summary


def test_plan_ids_are_deterministic_and_a_small_plan_is_a_prefix(parts):
    train = parts["train"]
    full = make_plan(train, 3, seed=5)
    small = make_plan(train, 3, seed=5, max_candidates=7)
    assert small.sample_ids == full.sample_ids[:7]
    assert len(set(full.sample_ids)) == len(full)
    assert all(sid.endswith("@5") for sid in full.sample_ids)
    negatives = [s for s, p, lev in zip(train.source, train.positive, train.level) if not p and lev != "apex"]
    assert len(full) == 3 * len(negatives)
    # apex negatives are reported with the reason, never silently dropped
    apex = {s for s, p, lev in zip(train.source, train.positive, train.level) if not p and lev == "apex"}
    assert {s["source"] for s in full.skipped} == apex and all("apex" in s["reason"] for s in full.skipped)
    assert make_plan(train, 3, seed=6).sample_ids != full.sample_ids


def test_candidate_inputs_do_not_depend_on_their_shard(parts, base):
    cfg = tiny_config(base, base / "unused")
    plan = make_plan(parts["train"], 2, seed=0)
    args = (plan.seed, cfg.scar_sampler, cfg.data, cfg.cohort.reference_angle)
    alone = build_shard_inputs(plan.slices, plan.jobs[5:6], *args)
    among = build_shard_inputs(plan.slices, plan.jobs[2:8], *args)
    assert np.array_equal(alone["scar"][0], among["scar"][3])
    assert json.loads(alone["meta"])["caption"][0] == json.loads(among["meta"])["caption"][3]
    scar = among["scar"][:, 0].astype(bool)
    labels = among["source_label"]
    assert scar.any(axis=(1, 2)).all() and (labels[scar] == MYOCARDIUM).all()
    assert (among["mask"][:, 0].astype(bool) >= scar).all()  # the inpainted region covers the scar


def test_store_layout_and_one_writer_per_shard(tmp_path):
    layout = StoreLayout(rows=10, height=8, width=8, shard_size=4)
    assert layout.shards == 3 and layout.shard_rows(2) == (8, 10)
    assert layout.shard_sizes().tolist() == [4, 4, 2]
    group = create_store(str(tmp_path / "s.zarr"), layout, {"candidates": 10})
    rows = {"image": np.full((2, 8, 8), 0.5, np.float32), "label": np.zeros((2, 8, 8), np.uint8),
            "condition": np.zeros((2, 8, 8), np.uint8), "dice": np.zeros(2, np.float32), "passed": np.zeros(2, bool),
            "seed": np.arange(2), "sample_id": ["a", "b"], "source": ["p/1", "p/1"], "caption": ["", ""],
            "spec": ["{}", "{}"], "skip_reason": ["", ""]}
    assert write_shard(group, 2, rows) == 2
    assert completed_shards(group).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="has \\(2,\\) rows, the shard holds 4"):
        write_shard(group, 0, rows)
    assert not completed_shards(group)[0]
    with pytest.raises(ValueError, match="'image' rows are \\(8, 6\\), the store's \\(8, 8\\)"):
        write_shard(group, 2, {**rows, "image": np.ones((2, 8, 6), np.float32)})
    # one chunk per sample, one shard object per shard
    image = zarr.open_group(str(tmp_path / "s.zarr"))["image"]
    assert image.chunks == (1, 8, 8) and image.shards == (4, 8, 8)
    # its key in the array's own folder ("c.<shard>.0.0": no folder per shard to make)
    assert sorted(os.listdir(tmp_path / "s.zarr" / "image")) == ["c.2.0.0", "zarr.json"]


def _shard_rows(rng, count, h, w, empty_images=False, empty_texts=False):
    """Rows of one shard: noisy images with some all-zero samples (inner chunks zarr leaves out),
    labels, scores and texts (all empty where asked: zarr then stores no text object)."""
    image = rng.random((count, h, w), dtype=np.float32)
    image[::3] = 0
    label = rng.integers(0, 4, (count, h, w), dtype=np.uint8)
    label[1::3] = 0
    if empty_images:
        image[:], label[:] = 0, 0
    text = ["" if empty_texts else f"x-{i}-é" for i in range(count)]
    return {"image": image, "label": label, "condition": (label == 2).astype(np.uint8),
            "dice": rng.random(count, dtype=np.float32), "passed": rng.random(count) > 0.5,
            "seed": rng.integers(0, 2**62, count), **{name: list(text) for name in TEXT_ARRAYS}}


def _plain_zarr_write(group, layout, shard, rows):
    """The reference: plain zarr slice assignment of every array, then the marker."""
    start, stop = layout.shard_rows(shard)
    for name in (*IMAGE_ARRAYS, *ROW_ARRAYS, *TEXT_ARRAYS):
        value = rows[name]
        group[name][start:stop] = np.asarray([str(v) for v in value], dtype=object) if name in TEXT_ARRAYS else value
    group[MARKER][shard] = 1


def _objects(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _negative_zeros(rows):
    """``rows`` with one image all -0.0 among others and every dice -0.0: not the fill value 0 to
    zarr (compared by bit pattern), so stored."""
    rows["image"][1] = -0.0
    rows["dice"][:] = -0.0
    return rows


@pytest.mark.parametrize("compression", ["fast", "small", "none"])
@pytest.mark.parametrize("encoded", ["direct", "generic", "zarr-fallback"])
def test_shard_writer_stores_the_bytes_plain_zarr_stores(tmp_path, monkeypatch, encoded, compression):
    """The writer's own encoding (vectorized for the store's codecs, generic for other codecs, and
    its fallback through zarr for codecs it does not run) stores byte for byte what plain zarr slice
    assignment stores, rewrites, partial shards and -0.0 included, whatever the store's compression."""
    from engine.synthesis import store

    if encoded != "direct":
        monkeypatch.setattr(store._RowShards, "of", classmethod(lambda cls, array, spec: None))
        monkeypatch.setattr(store._WholeChunk, "of", classmethod(lambda cls, array, spec: None))
    if encoded == "zarr-fallback":
        monkeypatch.setattr(store._ShardEncoder, "supports", staticmethod(lambda array, size: False))
    layout = StoreLayout(rows=11, height=8, width=6, shard_size=4)  # the last shard is partial (3 rows)
    fast, plain = tmp_path / "fast.zarr", tmp_path / "plain.zarr"
    groups = {path: create_store(str(path), layout, {"candidates": 11}, compression=compression) for path in (fast, plain)}
    codecs = {name: [c.to_dict()["name"] for c in groups[fast][name].metadata.codecs[0].codecs]
              for name in ("image", "label")}  # inside the sharding codec
    assert codecs == {"fast": {"image": ["bytes"], "label": ["bytes", "blosc"]},
                      "small": {"image": ["bytes", "zstd"], "label": ["bytes", "zstd"]},
                      "none": {"image": ["bytes"], "label": ["bytes"]}}[compression]
    writer = ShardWriter(groups[fast], layout)
    assert len(writer.encoders) == (0 if encoded == "zarr-fallback" else len(ShardWriter.NAMES))
    assert (writer.marker_encoder is not None) == (encoded != "zarr-fallback")
    direct = {name: type(encoder.direct).__name__ for name, encoder in writer.encoders.items()}
    if encoded == "direct":
        assert direct == {name: "_RowShards" if name in IMAGE_ARRAYS else "_WholeChunk" for name in ShardWriter.NAMES}
        assert isinstance(writer.marker_encoder.direct, store._WholeChunk)
    else:
        assert set(direct.values()) <= {"NoneType"}
    assert writer.folders is not None  # a local folder: written in the calling thread
    rng = np.random.default_rng(3)
    batches = [(0, _shard_rows(rng, 4, 8, 6)), (2, _shard_rows(rng, 3, 8, 6, empty_texts=True)),
               (1, _shard_rows(rng, 4, 8, 6, empty_images=True)),
               (0, _shard_rows(rng, 4, 8, 6, empty_images=True, empty_texts=True)),  # a rewrite deletes objects
               (1, _negative_zeros(_shard_rows(rng, 4, 8, 6, empty_images=True))),
               (2, _negative_zeros(_shard_rows(rng, 3, 8, 6)))]
    for shard, rows in batches:
        assert writer.write(shard, rows) == len(rows["dice"])
        _plain_zarr_write(groups[plain], layout, shard, rows)
        assert _objects(fast) == _objects(plain), f"after shard {shard}"
    writer.close()
    assert not (fast / "image" / "c.0.0.0").exists() and (fast / "image" / "c.1.0.0").exists()
    assert not (fast / "skip_reason" / "c.0").exists()
    # read back with plain zarr
    stored, last = zarr.open_group(str(fast), mode="r"), batches[-1][1]
    assert completed_shards(stored).tolist() == [True, True, True]
    assert np.array_equal(stored["image"][8:11], last["image"]) and np.array_equal(stored["label"][8:11], last["label"])
    assert np.signbit(stored["image"][9]).all() and np.signbit(stored["dice"][8:11]).all()
    assert [str(v) for v in stored["sample_id"][8:11]] == last["sample_id"]
    assert np.array_equal(stored["seed"][8:11], last["seed"]) and np.array_equal(stored["passed"][8:11], last["passed"])


@pytest.mark.parametrize("compression", ["fast", "none"])
def test_shard_writer_puts_through_zarr_outside_a_local_folder(compression):
    """In any store but a local folder (here zarr's memory store; object storage, fsspec) the writer
    puts the objects through zarr's IO loop: the same objects as plain zarr slice assignment."""
    from zarr.storage import MemoryStore

    layout = StoreLayout(rows=11, height=8, width=6, shard_size=4)
    stores = {"writer": MemoryStore(), "plain": MemoryStore()}
    groups = {name: create_store(s, layout, {}, compression=compression) for name, s in stores.items()}
    writer = ShardWriter(groups["writer"], layout)
    assert writer.folders is None
    rng = np.random.default_rng(5)
    for shard, rows in [(0, _shard_rows(rng, 4, 8, 6)), (2, _negative_zeros(_shard_rows(rng, 3, 8, 6))),
                        (0, _shard_rows(rng, 4, 8, 6, empty_images=True, empty_texts=True))]:
        writer.write(shard, rows)
        _plain_zarr_write(groups["plain"], layout, shard, rows)
        objects = {name: {key: value.to_bytes() for key, value in s._store_dict.items()} for name, s in stores.items()}
        assert objects["writer"] == objects["plain"], f"after shard {shard}"
    assert completed_shards(groups["writer"]).tolist() == [True, False, True]


def test_nonzero_rows_is_exact_where_the_sampled_positions_are_zero():
    """The writer's test of a stored inner chunk reads a few positions of a row first: a row whose
    only set bits lie elsewhere is still found, as is a row of -0.0 (zarr compares by bit pattern)."""
    from engine.synthesis.store import _nonzero_rows

    rows = np.zeros((6, 96 * 96), np.float32)
    rows[1, 97] = 1e-30  # one value, off the sampled positions (every 144th)
    rows[2, :] = -0.0
    rows[3, ::144] = 0.5  # only the sampled positions
    rows[5] = np.random.default_rng(0).random(96 * 96, dtype=np.float32)
    expected = rows.view(np.uint32).any(axis=1)
    assert expected.tolist() == [False, True, True, True, False, True]
    assert _nonzero_rows(rows).tolist() == expected.tolist()
    masks = np.zeros((3, 7), np.uint8)  # rows shorter than the sample count
    masks[1, 6] = 2
    assert _nonzero_rows(masks).tolist() == [False, True, False]


@pytest.mark.parametrize("writev", ["short writes", "no writev"])
def test_local_writes_finish_what_a_short_write_leaves(tmp_path, monkeypatch, writev):
    """An object written from its parts is whole even where the system writes only a few bytes at a
    time (``writev`` may return early), and where there is no ``writev`` at all."""
    from engine.synthesis import store

    write, gather = os.write, os.writev
    calls = []
    if writev == "no writev":
        monkeypatch.delattr(os, "writev")
    else:
        def short_writev(fd, buffers):  # the first 7 bytes of what the buffers hold together
            calls.append(len(buffers))
            return gather(fd, [b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[:7]])
        monkeypatch.setattr(os, "writev", short_writev)
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, memoryview(data)[:5]))
    image = np.random.default_rng(1).random((3, 4, 5), dtype=np.float32)
    parts = [image.view(np.uint8).reshape(3, -1)[1:], b"", b"index-bytes", np.arange(9, dtype=np.uint8)]
    store._write_local(str(tmp_path / "sub" / "c.0.0.0"), parts)
    assert (tmp_path / "sub" / "c.0.0.0").read_bytes() == b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    assert os.listdir(tmp_path / "sub") == ["c.0.0.0"]  # no temporary file left
    assert (len(calls) > 10) == (writev == "short writes")


def test_shard_writer_marks_a_shard_only_once_all_of_it_is_stored():
    from zarr.storage import MemoryStore

    class FailingStore(MemoryStore):  # every put of the label array fails
        async def set(self, key, value, byte_range=None):
            if key.startswith("label/c."):
                raise OSError("label put failed")
            await super().set(key, value)

    layout = StoreLayout(rows=8, height=4, width=4, shard_size=4)
    store = FailingStore()
    group = create_store(store, layout, {})
    writer = ShardWriter(group, layout)
    with pytest.raises(OSError, match="label put failed"):
        writer.write(1, _shard_rows(np.random.default_rng(0), 4, 4, 4))
    assert not completed_shards(zarr.open_group(store=store, mode="r")).any()


@pytest.mark.parametrize("where", ["local folder", "fsspec memory"])
def test_create_store_refuses_a_path_holding_other_objects(tmp_path, where):
    """A store URL pointing at a folder of other files (a run folder) is refused, its files left
    whole; an empty or missing folder is fine, and an earlier store there is replaced."""
    import fsspec

    if where == "local folder":
        run = str(tmp_path / "run")
        (tmp_path / "run" / "reward").mkdir(parents=True)
        (tmp_path / "run" / "empty").mkdir()
    else:
        run = f"memory://refuse-{tmp_path.name}/run"
    memory = fsspec.filesystem("memory")
    weights = f"{run}/reward/reward.safetensors"
    with fsspec.open(weights, "wb") as f:
        f.write(b"weights")
    layout = StoreLayout(rows=4, height=4, width=4, shard_size=2)
    with pytest.raises(ValueError, match=f"{run}: cannot create the synthetic store there: the path already "
                                         "holds objects that are not a Zarr store"):
        create_store(run, layout, {"candidates": 4})
    with fsspec.open(weights, "rb") as f:
        assert f.read() == b"weights"
    if where == "local folder":
        assert sorted(os.listdir(run)) == ["empty", "reward"]
    else:
        assert memory.find(run) == [weights.removeprefix("memory:/")]
    for url in (f"{run}/empty", f"{run}/new.zarr"):
        group = create_store(url, layout, {"candidates": 4})
        write_shard(group, 0, {**_shard_rows(np.random.default_rng(0), 2, 4, 4), "passed": np.ones(2, bool)})
        again = create_store(url, layout, {"candidates": 5})  # an earlier store: replaced
        assert store_attrs(again) == {"candidates": 5} and not completed_shards(again).any()


def _store_with_an_incomplete_shard(url):
    """10 candidates in shards of 4, every other one passed; shard 1 left as a writer stopped in
    the middle of it leaves it on object storage: ``passed`` stored, its image not, no flag."""
    layout = StoreLayout(rows=10, height=4, width=4, shard_size=4)
    group = create_store(url, layout, {"candidates": 10, "config": {"threshold": 0.5, "keep_rejected": False}})
    writer = ShardWriter(group, layout)
    for shard in range(3):
        start, stop = layout.shard_rows(shard)
        rows = _shard_rows(np.random.default_rng(shard), stop - start, 4, 4)
        passed = np.arange(start, stop) % 2 == 0
        rows["image"] = np.full((stop - start, 4, 4), 0.5, np.float32)
        rows.update(passed=passed, dice=np.where(passed, 0.9, 0.1).astype(np.float32),
                    sample_id=[f"s{i}" for i in range(start, stop)])
        writer.write(shard, rows)
    group["image"][4:8] = 0  # zarr deletes the object of an all-fill shard
    group[MARKER][1] = 0
    return group


@pytest.mark.parametrize("where", ["local folder", "fsspec memory"])
def test_readers_return_only_the_rows_of_complete_shards(tmp_path, monkeypatch, caplog, where):
    """Every reader (numpy arrays, the row selection, the selection by Dice, the torch Dataset, the
    Ray Dataset) returns and counts only the samples of complete shards, and logs how many shards
    it skipped: an incomplete shard's ``passed`` may be stored while its image is not."""
    url = str(tmp_path / "s.zarr") if where == "local folder" else f"memory://incomplete-{tmp_path.name}/s.zarr"
    group = _store_with_an_incomplete_shard(url)
    assert completed_shards(group).tolist() == [True, False, True]
    kept, every = ["s0", "s2", "s8"], ["s0", "s1", "s2", "s3", "s8", "s9"]
    with caplog.at_level("WARNING", logger="engine.synthesis.store"):
        assert synthetic_rows(url).tolist() == [0, 2, 8]
        arrays = read_synthetic_arrays(url)
        assert arrays["sample_id"] == kept and (arrays["image"] == 0.5).all()
        assert read_synthetic_arrays(url, passed_only=False)["sample_id"] == every
        assert read_synthetic_arrays(url, min_dice=0.5)["sample_id"] == kept
        assert select_samples(open_store(url), 0.5, url).tolist() == [0, 2, 8]
        with pytest.raises(ValueError, match=r"rows \[4\] are not among the selected samples"):
            read_synthetic_arrays(url, rows=[0, 4])
        dataset = SyntheticDataset(url)
        assert len(dataset) == 3 and [s["sample_id"] for s in dataset.__getitems__(range(3))] == kept
        assert all((s["image"] == 0.5).all() for s in dataset.__getitems__(range(3)))
        assert [dataset[i]["sample_id"] for i in range(3)] == kept
        assert [s["sample_id"] for s in SyntheticDataset(url, passed_only=False).__getitems__(range(6))] == every
    said = [r.getMessage() for r in caplog.records if "1 of 3 shard(s) incomplete, their rows not read" in r.message]
    assert len(said) == 8 and all(m.startswith(url) for m in said)
    if where == "fsspec memory":  # read in this process, handed to Ray as blocks: no cluster needed to see them
        import ray

        from engine.synthesis import store

        monkeypatch.setattr(store, "SHARDS_PER_READ_TASK", 1)
        monkeypatch.setattr(ray.data, "from_arrow", lambda blocks: blocks)
        blocks = store.read_store_dataset(url)
        assert [sid for block in blocks for sid in block.column("sample_id").to_pylist()] == kept
        assert all((np.stack(block.column("image").to_numpy(zero_copy_only=False)) == 0.5).all() for block in blocks)


class _InFlightStore:
    """A zarr store wrapper whose every get waits 10 ms (object storage's latency, in small) and
    counts the gets in flight at once (``peak``)."""

    @staticmethod
    def wrap(store):
        import asyncio

        from zarr.storage import WrapperStore

        class InFlight(WrapperStore):
            now = peak = 0

            def _with_store(self, inner):
                return type(self)(inner)

            async def get(self, key, prototype, byte_range=None):
                type(self).now += 1  # on the class: zarr may re-wrap the store (read-only views)
                type(self).peak = max(type(self).peak, type(self).now)
                try:
                    await asyncio.sleep(0.01)
                    return await self._store.get(key, prototype, byte_range)
                finally:
                    type(self).now -= 1

        return InFlight(store)


def test_shard_reader_reads_what_zarr_reads_with_the_arrays_in_flight_at_once():
    """ShardReader returns what plain zarr slicing returns (partial last shard, empty rows, texts),
    fetching all arrays of a shard, and several shards ahead, at once; a shard it cannot decode
    yields its error in its place and the other shards still arrive, in order."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    layout = StoreLayout(rows=11, height=8, width=6, shard_size=4)
    memory = MemoryStore()
    writer = ShardWriter(create_store(memory, layout, {}), layout)
    rng = np.random.default_rng(7)
    for shard, rows in [(0, _shard_rows(rng, 4, 8, 6)), (1, _shard_rows(rng, 4, 8, 6, empty_images=True)),
                        (2, _shard_rows(rng, 3, 8, 6))]:
        writer.write(shard, rows)
    store = _InFlightStore.wrap(memory)
    group = zarr.open_group(store=store, mode="r")
    names = (*IMAGE_ARRAYS, *ROW_ARRAYS, *TEXT_ARRAYS)
    reader = ShardReader(group, layout=layout)
    type(store).peak = 0
    for shard in range(3):
        got, (start, stop) = reader.read(shard), layout.shard_rows(shard)
        assert set(got) == set(names)
        for name in names:
            np.testing.assert_array_equal(got[name], np.asarray(group[name][start:stop]), err_msg=f"{shard} {name}")
    assert type(store).peak >= len(names)  # one shard: every array's get at once
    row = reader.row(9)
    assert all(np.array_equal(row[name], np.asarray(group[name][9])) for name in names)
    assert str(row["sample_id"]) == "x-1-é"
    type(store).peak = 0
    batch = reader.rows([9, 0, 5])
    assert type(store).peak >= 3 * len(names)  # a batch of rows: every row's arrays at once
    for i, got in zip([9, 0, 5], batch):
        assert all(np.array_equal(got[name], np.asarray(group[name][i])) for name in names)
    type(store).peak = 0
    assert [shard for shard, _ in reader.iter_shards(range(3), ahead=3)] == [0, 1, 2]
    assert type(store).peak >= 2 * len(names)  # shards ahead in flight together
    # a damaged shard object: its error in its place, the others still read
    key = "image/" + ShardWriter(create_store(MemoryStore(), layout, {}), layout).encoders["image"].key(2)
    from zarr.core.sync import sync

    sync(memory.set(key, default_buffer_prototype().buffer.from_bytes(b"not a shard")))
    results = dict(reader.iter_shards([2, 0], ahead=2))
    assert list(results) == [2, 0] and isinstance(results[2], Exception)
    np.testing.assert_array_equal(results[0]["image"], np.asarray(group["image"][0:4]))


def test_whole_row_arrays_are_read_with_many_chunks_in_flight():
    """A row array is one chunk per shard: read whole (passed, dice, ... of a large store) with
    more chunk reads in flight than zarr's default of 10, and the same values."""
    from zarr.storage import MemoryStore

    from engine.synthesis.store import READ_CONCURRENCY, read_arrays

    layout = StoreLayout(rows=40, height=2, width=2, shard_size=1)  # 40 shards: 40 chunks per row array
    memory = MemoryStore()
    group = create_store(memory, layout, {})
    passed = np.arange(40) % 3 == 0
    group["passed"][:] = passed
    group["dice"][:] = np.linspace(0, 1, 40, dtype=np.float32)
    store = _InFlightStore.wrap(memory)
    type(store).peak = 0
    got = read_arrays(zarr.open_group(store=store, mode="r"), ("passed", "dice"))
    assert np.array_equal(got["passed"], passed) and np.allclose(got["dice"], np.linspace(0, 1, 40))
    assert READ_CONCURRENCY > zarr.config.get("async.concurrency")
    assert type(store).peak >= 40  # zarr's default of 10 chunks per array would keep 20 in flight


@pytest.mark.parametrize("where", ["local folder", "memory store", "group below the store's root", "fsspec memory"])
def test_completed_shards_from_a_listing_equal_the_flags(tmp_path, where):
    """The complete shards found by listing the flag objects are those whose flag reads 1, wherever
    the store and its group sit; a flag reset to 0 is no object (zarr's fill value)."""
    from zarr.storage import MemoryStore, StorePath

    from engine.synthesis.store import _listed_flags

    layout = StoreLayout(rows=5 * 4, height=4, width=4, shard_size=4)
    url = {"local folder": str(tmp_path / "s.zarr"), "memory store": MemoryStore(),
           "group below the store's root": StorePath(MemoryStore(), "runs/demo/s.zarr"),
           "fsspec memory": f"memory://flags-{tmp_path.name}/s.zarr"}[where]
    group = create_store(url, layout, {})
    assert _listed_flags(group[MARKER]) is not None  # the listing, not the fallback, answers
    assert completed_shards(group).tolist() == [False] * 5
    for shard in (0, 2, 3, 4):
        group[MARKER][shard] = 1
    group[MARKER][4] = 0  # reset: zarr deletes the object of a fill-value chunk
    expected = [True, False, True, True, False]
    assert completed_shards(group).tolist() == expected == completed_shards(group, read_flags=True).tolist()
    assert completed_shards(open_store(url) if isinstance(url, str) else zarr.open_group(url, mode="r")).tolist() == expected


def test_progress_line_counts_earlier_runs_and_estimates_the_time_left():
    from engine.synthesis.pipeline import _duration, _Progress

    now = [100.0]
    progress = _Progress(np.array([4, 4, 4, 4]), np.array([True, False, False, False]), clock=lambda: now[0])
    now[0] = 120.0
    assert progress.line(np.array([True, True, True, False])) == (
        "synthesis: 3 of 4 shards complete (12 of 16 candidates, 75%); this run 8 in 20s (0.40 candidates/s), "
        "about 10s left")  # the shard of an earlier run is complete, not made by this run
    assert progress.line(np.array([True, False, False, False])).endswith("this run 0 in 20s (0.00 candidates/s)")
    assert "left" not in progress.line(np.ones(4, bool))
    assert [_duration(s) for s in (45, 185, 7620)] == ["45s", "3m05s", "2h07m"]


def test_shard_watch_logs_the_progress_read_from_the_store(tmp_path):
    """The driver's watcher logs the store's complete shards as they land, every interval."""
    import time

    from engine.synthesis.pipeline import _Progress, _watch_shards

    layout = StoreLayout(rows=4 * 2, height=4, width=4, shard_size=2)
    url = str(tmp_path / "s.zarr")
    group = create_store(url, layout, {})
    lines: list[str] = []
    progress = _Progress(np.full(4, 2), np.zeros(4, bool))
    with _watch_shards(url, None, 0.0, progress, 0.1, log=lines.append):
        for shard in range(4):
            group[MARKER][shard] = 1
            deadline = time.monotonic() + 20  # the next shard lands once the watcher has logged this one
            while not any(line.startswith(f"synthesis: {shard + 1} of 4 shards") for line in lines):
                assert time.monotonic() < deadline, f"no progress line for shard {shard}: {lines}"
                time.sleep(0.02)
    counts = [int(line.split()[1]) for line in lines]
    assert counts == sorted(counts) and set(counts) == {1, 2, 3, 4}, lines
    assert "(8 of 8 candidates, 100%)" in lines[-1]
    silent: list[str] = []
    with _watch_shards(url, None, 0.0, progress, 0.0, log=silent.append):  # no interval, no stall timeout: no thread
        time.sleep(0.3)
    assert silent == []


def test_sequential_run_writes_every_candidate_once_with_provenance(done_run):
    cfg, summary = done_run
    url = cfg.synthesis.store_url(cfg.run_dir)
    assert summary["candidates"] == 18 and summary["shards_complete"] == summary["shards"] == 5
    assert summary["kept"] == summary["made"] and summary["written"] == 18
    group = zarr.open_group(url, mode="r")  # plain zarr reads it
    attrs = group.attrs["lgesynth"]
    assert set(attrs["content"]["checkpoints"]) == {"reward", "vae", "unet", "controlnet"}
    assert attrs["engine_version"] and attrs["seed"] == 0 and attrs["complete"] is True
    assert "storage_options" not in attrs["config"]
    ids = [str(s) for s in group["sample_id"][:]]
    assert len(set(ids)) == 18 and all("#" in s and s.endswith("@0") for s in ids)
    # the kept region is the input slice exactly, the scar is the filter's prediction in the myocardium
    label = group["label"][:]
    assert np.isin(label, (0, 1, 2, 3)).all() and set(np.unique(label)) >= {1, 2}
    summary_check, problems = check_store(url)
    assert problems == [] and summary_check["unique_ids"] == 18


def test_xarray_opens_the_store_as_one_dataset_over_the_samples(done_run):
    import xarray as xr  # the test extra's
    cfg, _ = done_run
    url = cfg.synthesis.store_url(cfg.run_dir)
    ds = xr.open_zarr(url, consolidated=False)
    group = zarr.open_group(url, mode="r")
    assert ds["image"].dims == ("sample", "y", "x") and ds["dice"].dims == ds["sample_id"].dims == ("sample",)
    assert ds.sizes["sample"] == 18 and ds["shard_complete"].dims == ("shard",)
    np.testing.assert_array_equal(ds["image"].values, group["image"][:])
    kept = ds.isel(sample=ds["passed"].values)  # a user's selection, by xarray alone
    assert kept.sizes["sample"] == int(group["passed"][:].sum())
    assert set(kept["sample_id"].values.tolist()) <= {str(s) for s in group["sample_id"][:]}


def test_kept_region_equals_the_source_slice(done_run, parts):
    cfg, _ = done_run
    group = zarr.open_group(cfg.synthesis.store_url(cfg.run_dir), mode="r")
    plan = make_plan(parts["train"], 2, seed=0, max_candidates=18)
    inputs = build_shard_inputs(plan.slices, plan.jobs[:4], 0, cfg.scar_sampler, cfg.data, cfg.cohort.reference_angle)
    source = (inputs["image"][:, 0] + 1) / 2
    outside = inputs["mask"][:, 0] == 0
    assert np.allclose(group["image"][:4][outside], source[outside], atol=1e-6)
    assert np.array_equal(group["condition"][:4], inputs["condition"][:, 0])


def test_rerun_is_idempotent_and_resumes_a_lost_shard(done_run):
    cfg, _ = done_run
    url = cfg.synthesis.store_url(cfg.run_dir)
    again = synthesize(cfg, sequential=True, log=lambda _: None)
    assert again["written"] == 0 and again["candidates"] == 18
    before = zarr.open_group(url)["image"][:]
    marker = Path(url) / "shard_complete" / "c.3"
    marker.unlink()  # as if the writer of shard 3 died before marking it complete
    shard3 = Path(url) / "image" / "c.3.0.0"
    other = Path(url) / "image" / "c.1.0.0"
    mtime_other = other.stat().st_mtime_ns
    resumed = synthesize(cfg, sequential=True, log=lambda _: None)
    assert resumed["written"] == 4 and resumed["shards_complete"] == 5
    assert other.stat().st_mtime_ns == mtime_other and shard3.exists()
    assert np.array_equal(zarr.open_group(url)["image"][:], before)
    assert check_store(url)[1] == []


def test_store_of_another_config_is_refused(done_run, base):
    cfg, _ = done_run
    other = tiny_config(base, Path(cfg.run_dir), ["synthesis.threshold=0.3", "synthesis.max_candidates=18"])
    with pytest.raises(ValueError, match="synthesis.threshold: -1.0 -> 0.3"):
        synthesize(other, sequential=True, log=lambda _: None)


def test_a_store_of_other_source_images_under_the_same_names_is_refused(done_run):
    """A cohort made again under the same patient names with other images (a phantom of another
    seed) is another plan: its store is not resumed. A store written before the sources were
    fingerprinted still resumes."""
    import dataclasses

    cfg, _ = done_run
    parts = prepare_arrays(cfg)[0]
    assert SynthesisJob(cfg, parts).open_or_create() is not None  # the same cohort: the same store
    train = parts["train"]
    image = train.image.copy()
    image[~train.positive] += 0.01  # the negative slices' pixels, nothing else
    other = {**parts, "train": dataclasses.replace(train, image=image)}
    job = SynthesisJob(cfg, other)
    with pytest.raises(ValueError, match=r"another plan, config or checkpoint \(sources: '[0-9a-f]{64}' -> "):
        job.open_or_create()
    url = cfg.synthesis.store_url(cfg.run_dir)
    group = open_store(url, "r+")
    stored = store_attrs(group)
    try:
        group.attrs["lgesynth"] = {**stored, "fingerprint": job.legacy_fingerprint}  # as an older engine wrote it
        assert store_attrs(job.open_or_create())["fingerprint"] == job.legacy_fingerprint
    finally:
        group.attrs["lgesynth"] = stored


def test_a_store_whose_creation_was_interrupted_is_created_anew(base, tmp_path):
    """A store stopped before create_store's last step (its attributes) holds nothing: the next run
    creates it anew; a Zarr group of something else without attributes is refused, clearly."""
    cfg = tiny_config(base, tmp_path, ["synthesis.max_candidates=4"])
    url = cfg.synthesis.store_url(cfg.run_dir)
    half = zarr.open_group(url, mode="w")
    half.create_array("image", shape=(4, 64, 64), dtype="float32")
    job = SynthesisJob(cfg)
    group = job.open_or_create()
    assert store_attrs(group)["fingerprint"] == job.fingerprint and MARKER in group
    assert job.open_or_create().attrs.asdict() == group.attrs.asdict()  # now a store of this plan
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("mine", shape=(2,), dtype="int8")
    job = SynthesisJob(tiny_config(base, tmp_path, ["synthesis.max_candidates=4", f"synthesis.store={other}"]))
    with pytest.raises(ValueError, match=f"{other}: a Zarr group without lgesynth's attributes, not a synthetic store"):
        job.open_or_create()
    assert "mine" in zarr.open_group(str(other), mode="r")


def test_rejected_candidates_keep_only_metadata_unless_asked(base, tmp_path):
    for keep in (False, True):
        cfg = tiny_config(base, tmp_path / str(keep), ["synthesis.threshold=0.999", "synthesis.max_candidates=4",
                                                        f"synthesis.keep_rejected={str(keep).lower()}"])
        summary = synthesize(cfg, sequential=True, log=lambda _: None)
        group = zarr.open_group(cfg.synthesis.store_url(cfg.run_dir), mode="r")
        assert summary["kept"] == 0 and not group["passed"][:].any()
        assert all(str(c) for c in group["caption"][:]) and np.isfinite(group["dice"][:]).all()
        assert (group["image"][:].max(axis=(1, 2)) > 0).all() == keep
        assert check_store(cfg.synthesis.store_url(cfg.run_dir))[1] == []


def test_memory_store_and_readers(base, tmp_path):
    cfg = tiny_config(base, tmp_path, ["synthesis.store=memory://readers/synthetic.zarr", "synthesis.threshold=-1.0",
                                       "synthesis.max_candidates=6"])
    summary = synthesize(cfg, sequential=True, log=lambda _: None)
    url = "memory://readers/synthetic.zarr"
    assert summary["store"] == url and summary["kept"] == 6
    arrays = read_synthetic_arrays(url)
    assert arrays["image"].shape == (6, 1, 64, 64) and len(arrays["sample_id"]) == 6
    from monai.transforms import Compose, EnsureTyped, ScaleIntensityd

    ds = SyntheticDataset(url, transform=Compose([ScaleIntensityd(keys="image"), EnsureTyped(keys=["image", "label"])]))
    sample = ds[2]
    assert len(ds) == 6 and tuple(sample["image"].shape) == (1, 64, 64) and sample["sample_id"] == arrays["sample_id"][2]
    assert {"caption", "dice", "source", "label"} <= set(sample) and (sample["label"] >= SCAR).any() == (arrays["label"][2] >= SCAR).any()
    assert [ds[i]["sample_id"] for i in range(6)] == list(arrays["sample_id"])
    np.testing.assert_array_equal(ds[4]["image"].numpy()[0], arrays["image"][4, 0] / arrays["image"][4, 0].max())
    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=4)  # whole batches through __getitems__
    first = next(iter(loader))
    assert list(first["sample_id"]) == list(arrays["sample_id"][:4]) and tuple(first["image"].shape) == (4, 1, 64, 64)
    assert torch.equal(first["image"][3], ds[3]["image"]) and torch.equal(first["label"][1], ds[1]["label"])
    opened = ds._reader
    ds._pid = -1  # as in a forked DataLoader worker: the parent's reader is not reused
    assert ds[1]["sample_id"] == arrays["sample_id"][1] and ds._reader is not opened


def test_drawing_before_reading_reads_only_the_drawn_samples_and_mixes_the_same(done_run, parts):
    """The downstream driver draws from the row arrays, then reads only the drawn rows: the same
    mix as reading every kept sample and drawing from them."""
    from engine.synthesis.store import synthetic_rows
    from engine.training.data import draw_synthetic, mix_real_and_synthetic

    cfg, _ = done_run
    url = cfg.synthesis.store_url(cfg.run_dir)
    whole = read_synthetic_arrays(url)
    rows = synthetic_rows(url)
    assert len(rows) == len(whole["image"]) == 18
    for seed in (0, 3):
        drawn = rows[draw_synthetic(len(rows), 5, seed)]
        subset = read_synthetic_arrays(url, rows=drawn)
        assert len(subset["image"]) == 5 and subset["sample_id"] == [whole["sample_id"][i] for i in np.searchsorted(rows, drawn)]
        before = mix_real_and_synthetic(parts["train"], whole, 5, seed=seed)
        after = mix_real_and_synthetic(parts["train"], subset, 5, seed=seed)
        assert before.source == after.source
        np.testing.assert_array_equal(before.image, after.image)
        np.testing.assert_array_equal(before.label, after.label)
    with pytest.raises(ValueError, match=r"rows \[18\] are not among the selected samples \(passed\)"):
        read_synthetic_arrays(url, rows=[0, 18])
    with pytest.raises(ValueError, match="asked for 19 synthetic samples but only 18 kept ones are available"):
        draw_synthetic(18, 19, what="kept ones")


def test_credentials_in_storage_options_are_refused():
    with pytest.raises(ValueError, match="must not hold credentials \\(client_kwargs.aws_secret_access_key\\)"):
        SynthesisConfig(storage_options={"client_kwargs": {"aws_secret_access_key": "x"}})
    with pytest.raises(ValueError, match="compression must be 'fast', 'small' or 'none', got 'lz4'"):
        SynthesisConfig(compression="lz4")


def _corrupt(url: str, what: str) -> None:
    group = open_store(url, "r+")
    if what == "nan":
        image = group["image"][0]
        image[3, 3] = np.nan
        group["image"][0] = image
    elif what == "label":
        label = group["label"][1]
        label[0, 0] = 9
        group["label"][1] = label
    elif what == "duplicate":
        group["sample_id"][5] = str(group["sample_id"][4])
    elif what == "incomplete":
        group["shard_complete"][1] = 0
    elif what == "passed":
        group["passed"][2] = not bool(group["passed"][2])
    elif what == "unreadable":  # shard 1's image object overwritten with bytes that are no shard
        (Path(url) / "image" / "c.1.0.0").write_bytes(b"not a shard")
    elif what in ("image", "caption", "source"):  # an object of complete shard 1 lost: read back as the fill value
        (Path(url) / what / ("c.1.0.0" if what == "image" else "c.1")).unlink()


@pytest.mark.parametrize("what, message", [
    ("nan", "image holds NaN"), ("label", "label values outside"), ("duplicate", "duplicate sample id"),
    ("incomplete", "shard(s) incomplete: 1"), ("passed", "passed disagrees with dice"),
    ("unreadable", "shard 1: unreadable"), ("image", "shard 1: rows 4, 5, 6, 7: passed but the image is all zero"),
    ("caption", "shard 1: rows 4, 5, 6, 7: passed with an empty caption"),
    ("source", "shard 1: rows 4, 5, 6, 7: passed with an empty source"),
])
def test_check_store_reports_each_kind_of_damage(done_run, tmp_path, capsys, what, message):
    import shutil

    cfg, _ = done_run
    url = str(tmp_path / "copy.zarr")
    shutil.copytree(cfg.synthesis.store_url(cfg.run_dir), url)
    assert main(["check-store", url]) == 0
    _corrupt(url, what)
    capsys.readouterr()
    assert main(["check-store", url]) == 1
    out = capsys.readouterr().out
    assert message in out and url in out


def test_check_store_compares_dice_as_the_filter_stored_it(done_run, tmp_path, capsys):
    """A Dice of exactly the threshold (0.6 = 2*3/10, stored as float32 0.6000000238) did not pass
    the filter; check-store must agree, not pass it in float64."""
    import shutil

    from engine.synthesis.store import store_attrs, update_attrs

    cfg, _ = done_run
    url = str(tmp_path / "copy.zarr")
    shutil.copytree(cfg.synthesis.store_url(cfg.run_dir), url)
    group = open_store(url, "r+")
    update_attrs(group, config={**store_attrs(group)["config"], "threshold": 0.6})
    passed = np.asarray(group["passed"][:], bool)
    assert passed[2]
    dice = np.where(passed, 1.0, 0.0).astype(np.float32)
    dice[2], passed[2] = 2 * 3 / 10, False
    group["dice"][:], group["passed"][:] = dice, passed
    assert main(["check-store", url]) == 0, capsys.readouterr().out
    group["passed"][2] = True
    capsys.readouterr()
    assert main(["check-store", url]) == 1
    assert "rows 2: passed disagrees with dice > 0.6" in capsys.readouterr().out


def test_the_filter_passes_only_a_dice_above_the_threshold_as_stored(base, tmp_path):
    """A candidate whose Dice is exactly the threshold is rejected, compared on the stored float32."""
    from engine.synthesis.actors import FilterActor

    cfg = tiny_config(base, tmp_path, ["synthesis.threshold=0.6"])
    filt = FilterActor(**SynthesisJob(cfg).actor_args()[1])
    size = cfg.data.crop_size
    scar = np.zeros((2, 1, size, size), np.uint8)
    scar[:, 0, 10, 10:15] = 1  # 5 pixels
    predicted = np.zeros((2, size, size), bool)
    predicted[0, 10, 12:17] = True  # 3 of 5 shared: Dice 2*3/10 = 0.6
    predicted[1, 10, 11:16] = True  # 4 of 5 shared: Dice 0.8
    filt.predict = lambda generated: predicted
    meta = {"skip_reason": ["", ""], "seed": [1, 2],
            **{k: ["a", "b"] for k in ("sample_id", "source", "caption", "spec")}}
    rows = filt.store_rows({"meta": json.dumps(meta), "generated": np.zeros((2, 1, size, size), np.float32),
                            "scar": scar, "source_label": np.full((2, size, size), 2, np.uint8), "condition": scar})
    assert rows["dice"].dtype == np.float32 and rows["dice"][0] == np.float32(0.6)
    assert rows["passed"].tolist() == [False, True]


def test_a_store_in_a_missing_bucket_is_a_clear_error(base, tmp_path, s3_endpoint, capsys):
    from engine.config import dump_config

    url = "s3://no-such-bucket/run/synthetic.zarr"
    cfg = tiny_config(base, tmp_path, [f"synthesis.store={url}",
                                       f"synthesis.storage_options={{endpoint_url: '{s3_endpoint}'}}"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert main(["synthesize", "--config", str(tmp_path / "c.yaml"), "--sequential"]) == 2
    err = capsys.readouterr().err
    assert f"lgesynth synthesize: error: {url}: cannot create the synthetic store" in err
    assert "bucket does not exist" in err


def test_check_store_on_a_missing_store(tmp_path, capsys):
    assert main(["check-store", str(tmp_path / "nothing.zarr")]) == 1
    assert "cannot open the synthetic store" in capsys.readouterr().out


def test_job_refuses_a_generator_of_another_crop_size(base, tmp_path):
    cfg = tiny_config(base, tmp_path, ["data.crop_size=96"])
    with pytest.raises(ValueError, match="trained on 64 px crops"):
        SynthesisJob(cfg)


@pytest.mark.parametrize("job", ["synthesize", "train_reward", "train_vae", "train_generator", "train_downstream"])
def test_job_entrypoints_take_a_config_and_overrides(job):
    import importlib.util

    path = Path(__file__).parents[1] / "jobs" / f"{job}.py"
    spec = importlib.util.spec_from_file_location(f"job_{job}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--config", "configs/demo.yaml", "seed=3", "synthesis.seed=1"])
    assert args.config == "configs/demo.yaml" and args.overrides == ["seed=3", "synthesis.seed=1"]
    with pytest.raises(SystemExit):
        module.parse_args([])


def test_ctrl_c_during_synthesize_says_what_stays_and_the_same_command_finishes(base, tmp_path, capsys, failpoints):
    """Ctrl-C (SIGINT) of `lgesynth synthesize` in the middle of a run: exit 130 with one line, no
    traceback; the same command then makes only the shards that were not complete. The run is held
    (a fail point) with its second shard stored but not yet marked complete, where the Ctrl-C lands."""
    import signal
    import subprocess
    import sys

    from engine.config import dump_config

    cfg = tiny_config(base, tmp_path, ["synthesis.num_inference_steps=2"])
    dump_config(cfg, tmp_path / "c.yaml")
    url = cfg.synthesis.store_url(cfg.run_dir)
    from tests.conftest import interruptible_module, sigint_ignored

    command = interruptible_module("engine.cli", "synthesize", "--config", str(tmp_path / "c.yaml"), "--sequential")
    failpoints.arm("store.shard_complete", at=2)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        held = failpoints.wait("store.shard_complete", 120, alive=lambda: proc.poll() is None)
        assert held["pid"] == proc.pid and held["shard"] == 1
        assert not sigint_ignored(proc.pid)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    done = completed_shards(open_store(url))
    assert done.tolist() == [True] + [False] * (len(done) - 1)  # shard 1's objects are stored, not its flag
    assert proc.returncode == 130, err
    assert "lgesynth synthesize: interrupted: the shards already written stay complete" in err
    assert "Traceback" not in err
    lines = []
    summary = synthesize(cfg, sequential=True, log=lines.append)
    assert f"{len(done) - done.sum()} shard(s)" in lines[0] and f"{done.sum()} already complete" in lines[0]
    assert summary["shards_complete"] == len(done) and check_store(url)[1] == []


def test_synthesize_without_trained_models_is_a_clear_error(base, tmp_path, capsys):
    from engine.config import dump_config

    cfg = tiny_config(base, tmp_path, [f"synthesis.generator={tmp_path / 'nothing'}"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert main(["synthesize", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nothing/unet.json: missing; train the unet model first" in err
