"""The three steps every shard of candidates goes through, as Ray Data UDFs (and as plain callables
for a sequential loop or a driver-side writer):

1. :func:`prepare_shards` (tasks): shard index -> candidate inputs (scar masks, edge maps, captions).
2. :class:`DiffusionActor` (actor pool): the generator, loaded once per actor, inpaints the scars.
3. :class:`FilterActor` (actor pool): the frozen reward model segments each generated image;
   Dice(predicted scar, conditioning scar) > threshold passes; the label becomes the source slice's
   cavity and myocardium with the predicted scar (inside the myocardium) as scar.

A batch is one shard (``batch_size=1`` rows of the pipeline; each column holds the shard's
candidates along its second axis), so a shard is never split across workers or writers. Inside an
actor the shard's candidates run in micro-batches of ``batch_size``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine import failpoints
from engine.anatomy.labels import MYOCARDIUM, SCAR


@dataclass
class PlanContext:
    """What the preparation tasks need, put once in the object store by the driver."""

    slices: Any  # SliceArrays
    jobs: np.ndarray
    seed: int
    shard_size: int
    sampler: Any  # ScarSamplerConfig
    data: Any  # SliceDataConfig
    reference_angle: float


def _resolve(value):
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def prepare_shards(batch: dict[str, np.ndarray], context) -> dict[str, Any]:
    """Ray Data task: ``{"shard": [i]}`` -> the shard's candidate inputs (one row per shard)."""
    from engine.synthesis.plan import build_shard_inputs

    ctx: PlanContext = _resolve(context)
    rows: list[dict[str, Any]] = []
    for shard in np.asarray(batch["shard"]).ravel():
        start = int(shard) * ctx.shard_size
        jobs = ctx.jobs[start:start + ctx.shard_size]
        inputs = build_shard_inputs(ctx.slices, jobs, ctx.seed, ctx.sampler, ctx.data, ctx.reference_angle)
        inputs.pop("masked_image")  # the generator blanks the region itself
        rows.append({"shard": int(shard), **inputs})
    return _stack_rows(rows)


def _stack_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = np.asarray(values, dtype=object) if isinstance(values[0], str) else np.stack(values)
    return out


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(batch["shard"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _device_and_autocast(num_gpus: float, dtype: str):
    import torch

    device = torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return device, lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return device, contextlib.nullcontext


def _set_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def place_model(model, device, channels_last: bool = True):
    """``model`` on ``device``, its 4-d weights in channels-last layout when ``channels_last`` (the
    convolutions' activations then follow: the layout oneDNN on CPU and tensor cores on GPU run
    fastest; same results up to float rounding). Returns the model."""
    import torch

    return model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)


def load_generator(generator_folder: str | Path, vae_folder: str | Path):
    """The exported LGESynthNet of ``generator_folder`` (UNet + ControlNet, sha256-verified) on the
    VAE of ``vae_folder``, frozen, in eval mode."""
    from engine.models.generator import GeneratorConfig
    from engine.training.checkpoint import read_model_config
    from engine.training.generator import build_generator

    folder = Path(generator_folder)
    if not (folder / "controlnet.json").is_file():
        raise FileNotFoundError(f"{folder}: no exported generator (controlnet.json); run `lgesynth train generator` first")
    model_cfg = GeneratorConfig.from_dict(read_model_config(folder, "controlnet")["model"])
    model = build_generator(model_cfg, vae_folder, folder)
    return model.eval().requires_grad_(False)


class DiffusionActor:
    """Inpaints every candidate of a shard with the generator (loaded once per actor).

    Args:
        generator_folder, vae_folder: the exported generator and its VAE.
        batch_size: candidates per ``generate`` call.
        num_inference_steps: sampler steps (0: the generator's own).
        num_gpus, dtype, torch_threads, channels_last: as :class:`engine.synthesis.config.ActorPoolConfig`.
    """

    def __init__(self, generator_folder: str, vae_folder: str, batch_size: int, num_inference_steps: int = 0,
                 num_gpus: float = 0.0, dtype: str = "auto", torch_threads: int = 1, channels_last: bool = True):
        _set_threads(torch_threads)
        self.device, self.autocast = _device_and_autocast(num_gpus, dtype)
        self.model = place_model(load_generator(generator_folder, vae_folder), self.device, channels_last)
        self.batch_size = batch_size
        self.steps = num_inference_steps or None

    def generate(self, inputs: dict[str, Any], noise_seeds: list[int]) -> np.ndarray:
        """Generated images float32 [n, 1, S, S] in [-1, 1] for one shard's inputs (rows without a
        scar are left as the input image)."""
        return generate_in_batches(self.model, inputs, noise_seeds, self.batch_size, self.device, self.autocast,
                                   num_inference_steps=self.steps)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return generated_rows(batch, self.generate)


def generate_in_batches(model, inputs: dict[str, Any], noise_seeds: list[int], batch_size: int, device, autocast,
                        **generate_kwargs) -> np.ndarray:
    """``model.generate`` (a latent diffusion model's batch contract) over one shard's inputs in
    micro-batches of ``batch_size``: images float32 [n, 1, S, S] in [-1, 1]; rows without a scar are
    left as the input image. Each candidate's noise comes from its own generator seeded by its
    ``noise_seeds`` entry, so a candidate does not depend on the batch it shares."""
    import torch

    image = np.asarray(inputs["image"], np.float32)
    out = image.copy()
    active = np.flatnonzero(np.asarray(inputs["scar"]).reshape(len(image), -1).any(1))
    for start in range(0, len(active), batch_size):
        idx = active[start:start + batch_size]
        batch = {k: torch.as_tensor(np.array(inputs[k][idx], np.float32), device=device)
                 for k in ("image", "mask", "condition")}
        batch["caption"] = [inputs["caption"][i] for i in idx]
        generators = [torch.Generator(device="cpu").manual_seed(int(noise_seeds[i])) for i in idx]
        with torch.inference_mode(), autocast():  # no autograd bookkeeping at all (no_grad still keeps version counters)
            generated = model.generate(batch, generator=generators, **generate_kwargs)
        out[idx] = generated.float().cpu().numpy()
    return out


def generated_rows(batch: dict[str, Any], generate) -> dict[str, Any]:
    """The diffusion stage's output rows: each shard's inputs with ``generated`` = ``generate(inputs,
    noise_seeds)``, less what the filter does not need (less to move between actors)."""
    rows = []
    for row in _rows(batch):
        failpoints.reach("synthesis.generate", shard=int(row["shard"]))
        meta = json.loads(str(row["meta"]))
        generated = generate({**row, "caption": meta["caption"]}, meta["noise_seed"])
        rows.append({k: v for k, v in row.items() if k not in ("image", "mask")} | {"generated": generated})
    return _stack_rows(rows)


def load_reward(reward_folder: str | Path):
    """The exported reward model, frozen (same as the generator stage's reward loss)."""
    from engine.models.reward import RewardModelConfig, build_reward_model
    from engine.training.checkpoint import load_model_weights, read_model_config

    folder = Path(reward_folder)
    if not (folder / "reward.json").is_file():
        raise FileNotFoundError(f"{folder}: no exported reward model (reward.json); run `lgesynth train reward` first")
    model = build_reward_model(RewardModelConfig.from_dict(read_model_config(folder, "reward")["model"]))
    load_model_weights(folder, "reward", model)
    return model.eval().requires_grad_(False)


class FilterActor:
    """Scores a shard's generated images with the frozen reward model and builds the store's rows.

    Args:
        reward_folder: the exported reward model.
        threshold: a candidate passes when Dice(predicted scar, conditioning scar) > threshold.
        keep_rejected: keep image, label and condition of rejected candidates (else zeroed).
        batch_size, num_gpus, dtype, torch_threads, channels_last: as :class:`DiffusionActor`.
    """

    def __init__(self, reward_folder: str, threshold: float, keep_rejected: bool, batch_size: int,
                 num_gpus: float = 0.0, dtype: str = "auto", torch_threads: int = 1, channels_last: bool = True):
        _set_threads(torch_threads)
        self.device, self.autocast = _device_and_autocast(num_gpus, dtype)
        self.model = place_model(load_reward(reward_folder), self.device, channels_last)
        self.threshold, self.keep_rejected, self.batch_size = threshold, keep_rejected, batch_size

    def predict(self, generated: np.ndarray) -> np.ndarray:
        """Predicted scar masks bool [n, S, S] of images [n, 1, S, S] in [-1, 1]."""
        import torch

        from engine.models.reward import predict_scar

        preds = []
        for start in range(0, len(generated), self.batch_size):
            x = torch.as_tensor(np.array(generated[start:start + self.batch_size], np.float32), device=self.device)
            with self.autocast():
                preds.append(predict_scar(self.model, x)[1][:, 0].cpu().numpy())
        return np.concatenate(preds) if preds else np.zeros((0, *generated.shape[2:]), bool)

    def store_rows(self, row: dict[str, Any]) -> dict[str, Any]:
        """One shard's rows in the store's schema (see :mod:`engine.synthesis.store`)."""
        from engine.evaluation.metrics import dice_per_sample
        from engine.synthesis.store import dice_above

        meta = json.loads(str(row["meta"]))
        generated = np.asarray(row["generated"], np.float32)
        scar = np.asarray(row["scar"])[:, 0] > 0
        made = np.asarray([not r for r in meta["skip_reason"]], bool)
        predicted = self.predict(generated) if len(generated) else np.zeros(scar.shape, bool)
        dice = np.where(made, dice_per_sample(predicted, scar), 0.0).astype(np.float32)
        passed = made & dice_above(dice, self.threshold)  # as stored: float32
        source_label = np.asarray(row["source_label"], np.uint8)
        label = source_label.copy()  # pipeline arrays are read-only views: build new ones
        label[predicted & (source_label == MYOCARDIUM)] = SCAR
        image = np.clip((generated[:, 0] + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
        condition = np.array(row["condition"], np.uint8)[:, 0]
        blank = ~made if self.keep_rejected else ~passed
        image[blank], label[blank], condition[blank] = 0.0, 0, 0
        return {
            "image": image, "label": label, "condition": condition, "dice": dice, "passed": passed,
            "seed": np.asarray(meta["seed"], np.int64),
            **{k: np.asarray(meta[k], dtype=object) for k in ("sample_id", "source", "caption", "spec", "skip_reason")},
        }

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = []
        for row in _rows(batch):
            rows = self.store_rows(row)
            text = {k: [str(v) for v in rows.pop(k)] for k in ("sample_id", "source", "caption", "spec", "skip_reason")}
            out.append({"shard": int(row["shard"]), **rows, "text": json.dumps(text)})
        return _stack_rows(out)


def unpack_store_rows(row: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A filtered pipeline row -> ``(shard, rows for engine.synthesis.store.write_shard)``."""
    rows = {k: np.asarray(row[k]) for k in ("image", "label", "condition", "dice", "passed", "seed")}
    rows.update({k: np.asarray(v, dtype=object) for k, v in json.loads(str(row["text"])).items()})
    return int(row["shard"]), rows
