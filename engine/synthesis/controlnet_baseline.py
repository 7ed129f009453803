"""The ControlNet baselines as synthesis methods (``controlnet``, ``controlnet-template``): the model
exported by ``lgesynth train controlnet`` in the diffusion actor pool's place (same rows in, same rows
out).

Each candidate gets the inputs every method gets (the negative source slice, the conditioning scar's
edge map, its caption, its noise seed); the model's whole output image is the candidate, nothing of
the input is blended back. ``controlnet`` samples from pure noise; ``controlnet-template`` starts from
the source slice noised to ``controlnet_baseline.template_strength`` (:mod:`engine.models.controlnet_baseline`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from engine.models.controlnet_baseline import check_strength
from engine.training.controlnet_baseline import MODEL_NAME


def method_strength(method: str, template_strength: float) -> float:
    """Where ``method`` starts sampling: 1.0 (pure noise) for ``controlnet``, ``template_strength``
    for ``controlnet-template``."""
    if method == "controlnet":
        return 1.0
    if method == "controlnet-template":
        return check_strength(template_strength, "controlnet_baseline.template_strength")
    raise ValueError(f"{method!r} is not a ControlNet baseline method (controlnet, controlnet-template)")


def controlnet_record(folder: str | Path, crop_size: int | None = None) -> dict[str, Any]:
    """The exported ControlNet baseline's config (``<folder>/controlnet_baseline.json``), checked
    against the crop size it will see.

    Raises:
        FileNotFoundError: nothing exported in ``folder``.
        ValueError: the model was trained on another crop size.
    """
    from engine.training.checkpoint import read_model_config

    folder = Path(folder)
    if not (folder / f"{MODEL_NAME}.json").is_file():
        raise FileNotFoundError(f"{folder}: no exported ControlNet baseline ({MODEL_NAME}.json); run `lgesynth train "
                                "controlnet` first (or set synthesis.controlnet)")
    record = read_model_config(folder, MODEL_NAME)
    if crop_size is not None and int(record["crop_size"]) != int(crop_size):
        raise ValueError(f"{folder}: the ControlNet baseline was trained on {record['crop_size']} px crops, the config "
                         f"asks for data.crop_size={crop_size}")
    return record


def load_controlnet_baseline(folder: str | Path, vae_folder: str | Path):
    """The exported ControlNet baseline of ``folder`` on the VAE of ``vae_folder`` (weights verified
    by sha256), frozen and in eval mode, and its record (:func:`controlnet_record`)."""
    from engine.models.controlnet_baseline import ControlNetBaseline
    from engine.models.generator import GeneratorConfig
    from engine.training.checkpoint import load_model_weights
    from engine.training.vae import load_vae

    record = controlnet_record(folder)
    vae, vae_cfg = load_vae(vae_folder)
    model = ControlNetBaseline(dataclasses.replace(GeneratorConfig.from_dict(record["model"]), vae=vae_cfg), vae=vae)
    load_model_weights(folder, MODEL_NAME, model.trained_parts())
    return model.eval().requires_grad_(False), record


class ControlNetBaselineActor:
    """Synthesizes every candidate of a shard with the ControlNet baseline (loaded once per actor).

    Args:
        controlnet_folder: the exported model (``<run_dir>/controlnet``).
        vae_folder: the run's VAE (the one the model was trained on).
        method: "controlnet" (from pure noise) or "controlnet-template" (from the noised source slice).
        batch_size: candidates per ``generate`` call.
        num_inference_steps: sampler steps of the full schedule (0: the model's own).
        template_strength: ``controlnet-template``'s start, in (0, 1]; ignored by ``controlnet``.
        num_gpus, dtype, torch_threads, channels_last: as :class:`engine.synthesis.config.ActorPoolConfig`.
    """

    def __init__(self, controlnet_folder: str, vae_folder: str, method: str, batch_size: int,
                 num_inference_steps: int = 0, template_strength: float = 0.6, num_gpus: float = 0.0,
                 dtype: str = "auto", torch_threads: int = 1, channels_last: bool = True):
        from engine.synthesis.actors import _device_and_autocast, _set_threads, place_model

        self.method, self.strength = method, method_strength(method, template_strength)
        _set_threads(torch_threads)
        self.device, self.autocast = _device_and_autocast(num_gpus, dtype)
        model, _ = load_controlnet_baseline(controlnet_folder, vae_folder)
        self.model = place_model(model, self.device, channels_last)
        self.batch_size = int(batch_size)
        self.steps = num_inference_steps or None

    def generate(self, inputs: dict[str, Any], noise_seeds: list[int]) -> np.ndarray:
        """Images float32 [n, 1, S, S] in [-1, 1] for one shard's inputs (``image``, ``mask``,
        ``condition``, ``caption``, ``scar``); rows without a scar are left as the input image."""
        from engine.synthesis.actors import generate_in_batches

        return generate_in_batches(self.model, inputs, noise_seeds, self.batch_size, self.device, self.autocast,
                                   num_inference_steps=self.steps, template_strength=self.strength)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from engine.synthesis.actors import generated_rows

        return generated_rows(batch, self.generate)
