"""Reading a synthetic store back: ``ShardReader`` vs plain zarr reads array by array.

A store of ``--shards`` shards of ``--shard-size`` candidates (``--size`` px; random images, masks
and captions of the store's schema, written by the engine's ``ShardWriter``) on three kinds of
store: a local folder, S3 (a moto server in its own process on 127.0.0.2), and zarr's memory store
behind ``zarr.testing.store.LatencyStore`` (``--latency-ms`` per get: object storage's first-byte
latency, without moto's own per-request cost). Two access patterns, each timed both ways in the
same run (median of ``--repeats``):

1. every shard, all its arrays (what ``lgesynth check-store`` and the Ray Dataset reader read):
   ``group[name][start:stop]`` array after array, each array opened per shard (the engine before
   ``ShardReader``, and what a zarr user writes), vs ``ShardReader.iter_shards`` (arrays opened
   once, a shard's arrays fetched at once, 8 shards ahead);
2. ``--rows`` random single rows of the eight arrays a ``SyntheticDataset`` sample holds:
   ``group[name][i]`` array after array vs ``ShardReader.row``;
3. the same rows in batches of ``--batch`` (a DataLoader's batch, which ``SyntheticDataset``
   fetches through ``__getitems__``): ``ShardReader.row`` after row vs ``ShardReader.rows``.

Also ``check_store`` end to end on the local and S3 stores (absolute seconds).

Usage: python benchmarks/bench_store_reads.py [--shards 32] [--shard-size 16] [--size 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HOST = "127.0.0.2"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--rows", type=int, default=64, help="random rows read in pattern 2")
    parser.add_argument("--batch", type=int, default=16, help="rows per batch in pattern 3")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="get latency of the latency store")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def shard_rows(rng, count: int, size: int) -> dict:
    """One shard's rows of the store's schema: noise images, a disc of labels, captions."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    label = np.where(disc, rng.integers(1, 5, (count, size, size)), 0).astype(np.uint8)
    ids = [f"patient{rng.integers(1000):03d}/slice{rng.integers(20):02d}/draw{i}" for i in range(count)]
    return {"image": rng.random((count, size, size), dtype=np.float32), "label": label,
            "condition": (label == 4).astype(np.uint8), "dice": rng.random(count, dtype=np.float32),
            "passed": rng.random(count) > 0.3, "seed": rng.integers(0, 2**62, count),
            "sample_id": ids, "source": ids, "spec": ids, "skip_reason": [""] * count,
            "caption": ["late gadolinium enhancement, subendocardial scar, basal anterior and anterolateral "
                        f"segments, transmurality {rng.integers(25, 100)}%" for _ in range(count)]}


def write(store, layout, args) -> None:
    from engine.synthesis.store import ShardWriter, create_store

    rng = np.random.default_rng(0)
    writer = ShardWriter(create_store(store, layout, {"candidates": layout.rows}), layout)
    for shard in range(layout.shards):
        writer.write(shard, shard_rows(rng, args.shard_size, args.size))


def array_by_array_shards(group, layout, names) -> int:
    count = 0
    for shard in range(layout.shards):
        start, stop = layout.shard_rows(shard)
        rows = {name: np.asarray(group[name][start:stop]) for name in names}
        count += len(rows["image"])
    return count


def reader_shards(group, layout, names) -> int:
    from engine.synthesis.store import ShardReader

    count = 0
    for _, rows in ShardReader(group, names, layout).iter_shards(range(layout.shards), ahead=8):
        count += len(rows["image"])
    return count


def array_by_array_rows(group, rows, names) -> int:
    return sum(len({name: np.asarray(group[name][int(i)]) for name in names}) for i in rows)


def reader_rows(group, rows, names) -> int:
    from engine.synthesis.store import ShardReader

    reader = ShardReader(group, names)
    return sum(len(reader.row(int(i))) for i in rows)


def reader_batches(group, rows, names, batch: int) -> int:
    from engine.synthesis.store import ShardReader

    reader = ShardReader(group, names)
    return sum(len(reader.rows(rows[i:i + batch])) for i in range(0, len(rows), batch))


def median_s(fn, repeats: int) -> float:
    fn()  # warm: connections, codecs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(args: argparse.Namespace) -> None:
    import fsspec
    import zarr
    from zarr.storage import MemoryStore
    from zarr.testing.store import LatencyStore

    from engine.synthesis.check import check_store
    from engine.synthesis.store import IMAGE_ARRAYS, ROW_ARRAYS, SAMPLE_ARRAYS, TEXT_ARRAYS, StoreLayout

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
          f"zarr {zarr.__version__}", flush=True)
    layout = StoreLayout(rows=args.shards * args.shard_size, height=args.size, width=args.size,
                         shard_size=args.shard_size)
    all_names = (*IMAGE_ARRAYS, *ROW_ARRAYS, *TEXT_ARRAYS)
    rows = np.random.default_rng(1).choice(layout.rows, size=min(args.rows, layout.rows), replace=False)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", HOST, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = []
    try:
        options = {"endpoint_url": f"http://{HOST}:{port}"}
        for _ in range(100):
            try:
                fsspec.filesystem("s3", skip_instance_cache=True, **options).mkdir("bench")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            local = str(Path(tmp, "reads.zarr"))
            memory = MemoryStore()
            stores = [("local folder", local, None), ("S3 (moto server process)", "s3://bench/reads.zarr", options),
                      (f"memory + {args.latency_ms:g} ms per get", memory, None)]
            for name, url, opts in stores:
                write(url if opts is None else zarr.storage.FsspecStore.from_url(url, storage_options=opts),
                      layout, args)
                if name.startswith("memory"):
                    group = zarr.open_group(store=LatencyStore(memory, get_latency=args.latency_ms / 1000), mode="r")
                else:
                    group = zarr.open_group(url, mode="r", storage_options=opts)
                plain = median_s(lambda g=group: array_by_array_shards(g, layout, all_names), args.repeats)
                ours = median_s(lambda g=group: reader_shards(g, layout, all_names), args.repeats)
                plain_rows = median_s(lambda g=group: array_by_array_rows(g, rows, SAMPLE_ARRAYS), args.repeats)
                ours_rows = median_s(lambda g=group: reader_rows(g, rows, SAMPLE_ARRAYS), args.repeats)
                batches = median_s(lambda g=group: reader_batches(g, rows, SAMPLE_ARRAYS, args.batch), args.repeats)
                check = ""
                if not name.startswith("memory"):
                    check_s = median_s(lambda u=url, o=opts: check_store(u, o), args.repeats)
                    check = f"; check_store end to end {check_s:.2f} s"
                print(f"{name}: {layout.shards} shards x {args.shard_size} rows, all arrays: array by array "
                      f"{plain:.2f} s, ShardReader {ours:.2f} s; {len(rows)} random rows of 8 arrays: array by "
                      f"array {plain_rows:.2f} s ({1000 * plain_rows / len(rows):.1f} ms a row), ShardReader "
                      f"{ours_rows:.2f} s ({1000 * ours_rows / len(rows):.1f} ms a row), in batches of {args.batch} "
                      f"{batches:.2f} s ({1000 * batches / len(rows):.1f} ms a row){check}", flush=True)
                lines.append(f"{name}: whole shards {plain / ours:.2f}x faster, single rows "
                             f"{plain_rows / ours_rows:.2f}x faster, rows in batches of {args.batch} "
                             f"{plain_rows / batches:.2f}x faster than array by array")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_args())
