"""A tiny synthesis run for the tests: a phantom cohort and randomly initialised exported models
(what the pipeline does does not depend on what the models learned)."""

from __future__ import annotations

from pathlib import Path

from engine.config import apply_overrides, from_dict
from engine.models.untrained import export_untrained
from engine.phantom import write_phantom_cohort
from engine.phantom.config import PhantomConfig
from engine.settings import EngineConfig

TINY_MODELS = [
    "data.crop_size=64",
    "reward.model.channels=[8,16,32]", "reward.model.strides=[2,2]", "reward.model.num_res_units=1",
    "vae.model.block_out_channels=[16,32]", "vae.model.norm_num_groups=8",
    "generator.model.text_encoder.kind=tiny-random", "generator.model.unet.cross_attention_dim=32",
    "generator.model.unet.block_out_channels=[16,32]", "generator.model.unet.layers_per_block=1",
    "generator.model.unet.attention_head_dim=8", "generator.model.unet.norm_num_groups=8",
    "generator.model.controlnet.conditioning_embedding_out_channels=[8,16]",
    "generator.model.num_inference_steps=2",
]
# Pools that fit on one 1-CPU node (so a run survives losing the other node) and leave room for
# preparation and writing.
SMALL_POOLS = ["synthesis.diffusion.num_cpus=0.25", "synthesis.filter.num_cpus=0.25", "synthesis.prepare_cpus=0.2"]


def make_tiny_run(base: Path, patients: int = 6, seed: int = 3) -> Path:
    """``base/cohort`` (phantom, 128 px) and ``base/models`` (untrained reward, VAE, generator)."""
    cohort = base / "cohort"
    if not cohort.exists():
        write_phantom_cohort(cohort, patients, seed=seed, cfg=PhantomConfig(image_size=128))
    cfg = tiny_config(base, base / "models")
    if not (base / "models" / "generator" / "controlnet.json").is_file():
        export_untrained(cfg, base / "models")
    return base


def tiny_config(base: Path, run_dir: Path, extra: list[str] | tuple[str, ...] = ()) -> EngineConfig:
    """The tiny run config: models from ``base/models``, store and split in ``run_dir``."""
    models = base / "models"
    overrides = [
        f"cohort.root={base / 'cohort'}", f"run_dir={run_dir}", *TINY_MODELS, "split.fractions=[0.5,0.25,0.25]",
        f"vae.pretrained={models / 'vae'}", f"synthesis.generator={models / 'generator'}",
        f"synthesis.reward={models / 'reward'}", "synthesis.shard_size=4", "synthesis.batch_size=4",
        "synthesis.candidates_per_slice=2", *SMALL_POOLS, *extra,
    ]
    return from_dict(EngineConfig, apply_overrides({}, overrides))


def shard_of_object(key: str) -> int | None:
    """The shard an object of a store holds, from its key relative to the store (``<array>/c.<shard>...``
    with the store's "." chunk keys), or None for metadata (``zarr.json``)."""
    parts = key.replace("/", ".").split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "c" else None
