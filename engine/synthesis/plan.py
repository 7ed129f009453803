"""The synthesis plan: which candidates a run makes, their deterministic ids and seeds, and the
candidate inputs of one shard (scar mask, edge map, caption) built from a negative slice.

Candidate ``draw`` of negative slice ``source`` has the sample id ``f"{source}#{draw}@{seed}"``; its
scar is drawn with ``derive_seed(seed, source, draw)`` and its diffusion noise with
``derive_seed(seed, source, draw, "noise")``. Nothing depends on which other candidates exist, their
order, the batch they share or the worker that makes them, so a re-run or a retry makes the same
candidate again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.anatomy.captions import caption
from engine.anatomy.labels import MYOCARDIUM
from engine.anatomy.masks import ScarSamplerConfig, apply_scar, edge_map, sample_scar
from engine.synthesis.store import StoreLayout
from engine.training.data import SCAR_LEVELS, SliceArrays, SliceDataConfig, derive_seed, dilate_masks, masked_image, select


def sample_id(source: str, draw: int, seed: int) -> str:
    """The deterministic id of a candidate."""
    return f"{source}#{draw}@{seed}"


def noise_seed(seed: int, source: str, draw: int) -> int:
    """Seed of a candidate's diffusion noise."""
    return derive_seed(seed, source, draw, "noise")


def _source_key(source: str) -> tuple:
    pid, _, index = source.rpartition("/")
    return (pid, int(index), "") if index.isdigit() else (pid, -1, index)


@dataclass
class SynthesisPlan:
    """Every candidate of a run, in sample-id order (patient, slice number, draw).

    Attributes:
        slices: the negative source slices that take scars (basal, mid and apical levels).
        jobs: int64 [M, 2], (row of ``slices``, draw) of each candidate.
        sample_ids: the M candidate ids.
        seed: the synthesis seed.
        skipped: candidates that cannot be made at all (negative apex slices: no AHA ring to place a
            scar in), ``{"sample_id", "source", "reason"}`` each: reported, never silently dropped.
    """

    slices: SliceArrays
    jobs: np.ndarray
    sample_ids: list[str]
    seed: int
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def layout(self, shard_size: int) -> StoreLayout:
        s = self.slices.crop_size
        return StoreLayout(rows=len(self), height=s, width=s, shard_size=shard_size)

    def fingerprint(self) -> str:
        """sha256 of the ordered sample ids (with the seed in every id)."""
        h = hashlib.sha256()
        for sid in self.sample_ids:
            h.update(sid.encode() + b"\n")
        return h.hexdigest()

    def sources_fingerprint(self) -> str:
        """sha256 of the source slices the candidates are made from (name, image crop and label
        of each, in plan order): a cohort made again under the same patient names with other
        images (a phantom of another seed, re-exported scans) is another plan, not a resume."""
        h = hashlib.sha256()
        for row in np.unique(self.jobs[:, 0]):
            h.update(self.slices.source[row].encode() + b"\n")
            h.update(np.ascontiguousarray(self.slices.image[row], dtype=np.float32).tobytes())
            h.update(np.ascontiguousarray(self.slices.label[row], dtype=np.uint8).tobytes())
        return h.hexdigest()


def make_plan(arrays: SliceArrays, candidates_per_slice: int, seed: int, max_candidates: int = 0) -> SynthesisPlan:
    """The plan over the negative slices of ``arrays``: ``candidates_per_slice`` draws each; with
    ``max_candidates`` > 0 only the first that many (a small run is a prefix of a larger one)."""
    if candidates_per_slice < 1:
        raise ValueError(f"candidates_per_slice must be >= 1, got {candidates_per_slice}")
    negatives = np.flatnonzero(~arrays.positive)
    order = sorted(negatives, key=lambda i: _source_key(arrays.source[i]))
    usable = [int(i) for i in order if arrays.level[i] in SCAR_LEVELS]
    skipped = [{"sample_id": sample_id(arrays.source[i], d, seed), "source": arrays.source[i],
                "reason": f"{arrays.level[i]} slice: scars are drawn on {', '.join(SCAR_LEVELS)} slices only"}
               for i in order if arrays.level[i] not in SCAR_LEVELS for d in range(candidates_per_slice)]
    slices = select(arrays, np.asarray(usable, np.int64))
    jobs = np.asarray([(row, d) for row in range(len(usable)) for d in range(candidates_per_slice)], np.int64).reshape(-1, 2)
    if max_candidates:
        jobs = jobs[:max_candidates]
    ids = [sample_id(slices.source[row], int(d), seed) for row, d in jobs]
    return SynthesisPlan(slices=slices, jobs=jobs, sample_ids=ids, seed=seed, skipped=skipped)


def condition_of(scar: np.ndarray, cfg: SliceDataConfig) -> np.ndarray:
    """The generator's condition of one scar mask: its edge map, or the filled mask."""
    return scar.copy() if cfg.condition == "mask" else edge_map(scar, cfg.edge_width)


def build_shard_inputs(slices: SliceArrays, jobs: np.ndarray, seed: int, sampler_cfg: ScarSamplerConfig,
                       data_cfg: SliceDataConfig, reference_angle: float) -> dict[str, Any]:
    """Inputs of the candidates ``jobs`` ((slice row, draw) pairs) of one shard.

    A draw whose slice cannot take the sampled scar (:func:`engine.anatomy.sample_scar` gives up)
    keeps its row with an empty scar and the reason in ``skip_reason``; it is never generated and
    never passes.

    Returns:
        ``image`` float32 [n, 1, S, S] in [-1, 1] (the negative slice), ``source_label`` uint8 [n, S, S],
        ``scar``, ``mask``, ``condition`` uint8 [n, 1, S, S], ``masked_image`` float32, and ``meta``:
        one JSON string with the lists ``sample_id``, ``source``, ``caption``, ``spec``,
        ``skip_reason`` and ``seed``/``noise_seed``.
    """
    n, s = len(jobs), slices.crop_size
    scars = np.zeros((n, s, s), bool)
    meta: dict[str, list] = {k: [] for k in ("sample_id", "source", "caption", "spec", "skip_reason", "seed", "noise_seed")}
    labels = np.zeros((n, s, s), np.uint8)
    for j, (row, draw) in enumerate(np.asarray(jobs, np.int64)):
        row, draw = int(row), int(draw)
        source, level, label = slices.source[row], slices.level[row], slices.label[row]
        labels[j] = label
        scar_seed = derive_seed(seed, source, draw)
        spec, reason, text = {}, "", ""
        try:
            mask, drawn = sample_scar(label, level, np.random.default_rng(scar_seed), sampler_cfg, reference_angle)
            scars[j] = mask & (label == MYOCARDIUM)
            spec = dict(vars(drawn))
            text = caption(apply_scar(label, scars[j]), level, reference_angle, data_cfg.caption_mode)
        except ValueError as exc:
            reason = str(exc)
        meta["sample_id"].append(sample_id(source, draw, seed))
        meta["source"].append(source)
        meta["caption"].append(text)
        meta["spec"].append(json.dumps(spec, sort_keys=True))
        meta["skip_reason"].append(reason)
        meta["seed"].append(scar_seed)
        meta["noise_seed"].append(noise_seed(seed, source, draw))
    rows = np.asarray(jobs, np.int64)[:, 0] if n else np.zeros(0, np.int64)
    image = slices.image[rows] * np.float32(2.0) - np.float32(1.0)
    mask = dilate_masks(scars, data_cfg.mask_dilation)[:, None].astype(np.uint8)
    condition = np.stack([condition_of(m, data_cfg) for m in scars]) if n else scars
    return {
        "image": image.astype(np.float32),
        "source_label": labels,
        "scar": scars[:, None].astype(np.uint8),
        "mask": mask,
        "condition": condition[:, None].astype(np.uint8),
        "masked_image": masked_image(image, mask.astype(np.float32)).astype(np.float32),
        "meta": json.dumps(meta),
    }
