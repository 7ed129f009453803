"""Export randomly initialised models of a config in the layout the training stages write.

For pipeline checks that do not depend on what the models learned: throughput benchmarks, tests of
the synthesis pipeline, and a dry run of a new cluster before any training. The records say
``"untrained": true``; nothing here is ever used where trained models are expected by default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


def export_untrained(cfg, run_dir: str | Path | None = None, seed: int = 0) -> dict[str, Path]:
    """Write ``reward/``, ``vae/`` and ``generator/`` (UNet + ControlNet) under ``run_dir`` (default
    ``cfg.run_dir``), seeded; returns the folders."""
    from engine.models.generator import LGESynthNet
    from engine.models.reward import build_reward_model
    from engine.models.vae import build_vae
    from engine.training.checkpoint import export_model

    run = Path(run_dir or cfg.run_dir)
    crop = cfg.data.crop_size
    torch.manual_seed(seed)
    folders = {"reward": run / "reward", "vae": run / "vae", "generator": run / "generator"}
    export_model(folders["reward"], "reward", build_reward_model(cfg.reward.model),
                 {"model": cfg.reward.model.to_dict(), "input_range": "-1,1", "crop_size": crop,
                  "pass_threshold": cfg.reward.pass_threshold, "untrained": True})
    vae = build_vae(cfg.vae.model)
    export_model(folders["vae"], "vae", vae, {"model": cfg.vae.model.to_dict(), "input_range": "-1,1",
                                              "crop_size": crop, "untrained": True})
    model_cfg = cfg.generator.model
    net = LGESynthNet(dataclasses.replace(model_cfg, vae=cfg.vae.model), vae=vae)
    net.init_controlnet_from_unet()
    record = {"model": model_cfg.to_dict(), "vae_folder": str(folders["vae"]), "input_range": "-1,1",
              "crop_size": crop, "phase": "controlnet", "untrained": True}
    export_model(folders["generator"], "unet", net.unet, record)
    export_model(folders["generator"], "controlnet", net.controlnet, record)
    return folders
