"""The SPADE baselines as synthesis methods (``spade-fc``, ``spade-lc``): the exported model of
``lgesynth train spade-fc|spade-lc`` in the diffusion actor pool's place (same rows in, same rows out).

Each candidate's semantic map is built from the same inputs every method gets (the negative source
slice, its labels, the conditioning scar and the inpainting mask; :func:`engine.models.spade.semantic_map`)
and the model's whole output image is the candidate: nothing of the input is blended back, which is
what makes full and limited context differ (:mod:`engine.models.spade`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "spade"  # <folder>/spade.safetensors + spade.json


def spade_record(folder: str | Path, method: str, crop_size: int | None = None) -> dict[str, Any]:
    """The exported SPADE model's config (``<folder>/spade.json``), checked against the method it
    serves and the crop size it will see.

    Raises:
        FileNotFoundError: nothing exported in ``folder``.
        ValueError: the model is the other variant (an FC model asked for by ``spade-lc``), or was
            trained on another crop size.
    """
    from engine.models.spade import CONTEXTS
    from engine.training.checkpoint import read_model_config

    folder = Path(folder)
    if method not in CONTEXTS:
        raise ValueError(f"{method!r} is not a SPADE method ({', '.join(CONTEXTS)})")
    if not (folder / f"{MODEL_NAME}.json").is_file():
        raise FileNotFoundError(f"{folder}: no exported SPADE model ({MODEL_NAME}.json); run `lgesynth train {method}` first "
                                "(or set synthesis.spade)")
    record = read_model_config(folder, MODEL_NAME)
    if record.get("context") != CONTEXTS[method]:
        raise ValueError(f"{folder}: holds a SPADE model with {record.get('context')!r} context, but {method} needs "
                         f"{CONTEXTS[method]!r} context; point synthesis.spade at the {method} export")
    if crop_size is not None and int(record["crop_size"]) != int(crop_size):
        raise ValueError(f"{folder}: the SPADE model was trained on {record['crop_size']} px crops, the config asks for "
                         f"data.crop_size={crop_size}")
    return record


def load_spade(folder: str | Path, method: str):
    """The exported SPADE model of ``folder`` (weights verified by sha256), frozen and in eval mode,
    and its record (:func:`spade_record`)."""
    from engine.models.spade import SpadeConfig, build_spade
    from engine.training.checkpoint import load_model_weights

    record = spade_record(folder, method)
    model = build_spade(SpadeConfig.from_dict(record["model"]), int(record["crop_size"]))
    load_model_weights(folder, MODEL_NAME, model)
    return model.eval().requires_grad_(False), record


class SpadeActor:
    """Synthesizes every candidate of a shard with a trained SPADE variant (loaded once per actor).

    Args:
        spade_folder: the exported model (``<run_dir>/spade-fc`` or ``spade-lc``).
        method: "spade-fc" or "spade-lc"; the model's context must match.
        batch_size: candidates per forward pass.
        num_gpus, dtype, torch_threads, channels_last: as :class:`engine.synthesis.config.ActorPoolConfig`.
    """

    def __init__(self, spade_folder: str, method: str, batch_size: int, num_gpus: float = 0.0, dtype: str = "auto",
                 torch_threads: int = 1, channels_last: bool = True):
        from engine.synthesis.actors import _device_and_autocast, _set_threads, place_model

        _set_threads(torch_threads)
        self.device, self.autocast = _device_and_autocast(num_gpus, dtype)
        model, record = load_spade(spade_folder, method)
        self.model = place_model(model, self.device, channels_last)
        self.method, self.context = method, record["context"]
        self.limited_margin_px, self.crop_size = int(record["limited_margin_px"]), int(record["crop_size"])
        self.batch_size = int(batch_size)

    def generate(self, inputs: dict[str, Any], noise_seeds: list[int]) -> np.ndarray:
        """Images float32 [n, 1, S, S] in [-1, 1] for one shard's inputs (``image``, ``source_label``,
        ``scar``, ``mask``); rows without a scar are left as the input image.

        ``noise_seeds`` are not used: SPADE without its image encoder has no noise input, so a
        candidate is a deterministic function of its semantic map.
        """
        import torch

        from engine.models.spade import semantic_map

        image = np.asarray(inputs["image"], np.float32)
        if image.ndim != 4 or image.shape[-1] != self.crop_size:
            raise ValueError(f"{self.method}: the model takes [n, 1, {self.crop_size}, {self.crop_size}] images, "
                             f"got {image.shape}")
        out = image.copy()
        scar, mask, label = (np.asarray(inputs[k]) for k in ("scar", "mask", "source_label"))
        active = np.flatnonzero(scar.reshape(len(image), -1).any(1))
        for start in range(0, len(active), self.batch_size):
            idx = active[start:start + self.batch_size]
            seg = semantic_map(image[idx], label[idx], scar[idx], mask[idx], self.context, self.limited_margin_px)
            with torch.no_grad(), self.autocast():
                generated = self.model(torch.as_tensor(seg, device=self.device))
            out[idx] = generated.float().clamp(-1.0, 1.0).cpu().numpy()
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from engine.synthesis.actors import generated_rows

        return generated_rows(batch, self.generate)
