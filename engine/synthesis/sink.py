"""The Zarr datasink: Ray Data write tasks that store whole shards (one writer per shard)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from engine.synthesis.actors import unpack_store_rows
from engine.synthesis.store import ShardWriter, open_store


class ZarrShardDatasink(Datasink):
    """Writes the filtered rows of the synthesis pipeline (one row per shard) into an existing store.

    The driver creates the store (arrays and provenance) before the pipeline starts and chooses
    which shards to make, so every shard reaches exactly one write task; a retried task rewrites its
    shard whole (same deterministic content) before marking it complete.

    Args:
        url: the store (local path or fsspec URL shared by all workers, e.g. ``s3://``).
        storage_options: fsspec options (no credentials; workers use their environment's).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url
        self.storage_options = dict(storage_options or {})

    def get_name(self) -> str:
        return "ZarrShards"

    def write(self, blocks: Iterable[Block], ctx) -> dict[str, Any]:
        writer = ShardWriter(open_store(self.url, "r+", self.storage_options))
        shards, candidates, passed = [], 0, 0
        try:
            for block in blocks:
                batch = BlockAccessor.for_block(block).to_batch_format("numpy")
                for i in range(len(batch["shard"])):
                    shard, rows = unpack_store_rows({k: v[i] for k, v in batch.items()})
                    candidates += writer.write(shard, rows)
                    passed += int(rows["passed"].sum())
                    shards.append(shard)
        finally:
            writer.close()
        return {"shards": shards, "candidates": candidates, "passed": passed}

    def on_write_complete(self, write_result) -> None:
        self.result = {
            "shards": sorted(s for r in write_result.write_returns for s in r["shards"]),
            "candidates": sum(r["candidates"] for r in write_result.write_returns),
            "passed": sum(r["passed"] for r in write_result.write_returns),
        }
