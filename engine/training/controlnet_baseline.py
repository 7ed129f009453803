"""Stage: train the paper's ControlNet baselines (DOMAIN.md section 6): ``lgesynth train controlnet``.

One trained model serves both synthesis methods, ``controlnet`` (from pure noise) and
``controlnet-template`` (from the noised negative source slice); the model and how each samples:
:mod:`engine.models.controlnet_baseline`. The training data are the generator's: the train patients'
positive slices with their scar edge maps and captions (:class:`engine.training.datasets.InpaintingDataset`,
the same augmentation; the condition settings follow ``generator.model``), but nothing is masked:
the loss is the diffusion MSE on the latents of the whole image, UNet and ControlNet trained together
from scratch, no reward. The VAE is the run's (``vae.pretrained`` or ``<run_dir>/vae``), frozen; the
text encoder, noise schedule and sampler are ``generator.model``'s. Validation: the diffusion MSE on
the val patients' positive slices at fixed timesteps and noise, comparable from epoch to epoch.

One Ray Train run, ``controlnet``, exported to ``<run_dir>/controlnet/controlnet_baseline.safetensors``
+ ``controlnet_baseline.json`` (UNet and ControlNet weights, one sha256; the resolved model config).
A run that already finished under the same config is not trained again; ``template_strength`` and
the sampler settings do not enter training, so changing them trains nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.models.controlnet_baseline import ControlNetBaselineConfig, check_strength
from engine.training.distributed import RayTrainConfig
from engine.training.loop import TrainLoopConfig, require_epochs

RUN = "controlnet"  # the Ray Train run and the export folder <run_dir>/controlnet
MODEL_NAME = "controlnet_baseline"  # <run_dir>/controlnet/controlnet_baseline.safetensors + .json
# config keys that only change how the model samples, not how it trains
SAMPLING_KEYS = ("stage.template_strength", "model.scheduler", "model.num_inference_steps", "model.guidance_scale",
                 "model.controlnet.conditioning_scale", "model.mask_dilation", "model.reward_t_max_fraction")


@dataclass
class ControlNetBaselineStageConfig:
    """Args:
        model: the UNet's layout and the ControlNet's conditioning embedding (text encoder, noise
            schedule, sampler, guidance and captions are ``generator.model``'s; the VAE is the run's).
        loop: epochs, batch size, optimizer (UNet and ControlNet in one optimizer).
        ray: workers and resources (``num_workers: 0`` trains in the calling process).
        template_strength: ``controlnet-template`` only: the noise level, as a fraction of the
            training schedule's ``T`` steps, that the negative source slice is noised to before
            sampling (SDEdit's ``t0``), in (0, 1]. Lower keeps more of the template's anatomy and
            leaves the edge map less to steer; 1 is the ``controlnet`` method. A sampling setting: it
            enters the ``controlnet-template`` store's fingerprint, not the training run.

    Example:
        >>> ControlNetBaselineStageConfig(template_strength=0.5).folder("runs/x").name
        'controlnet'
    """

    model: ControlNetBaselineConfig = field(default_factory=ControlNetBaselineConfig)
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=20, batch_size=8, lr=2e-4))
    ray: RayTrainConfig = field(default_factory=RayTrainConfig)
    template_strength: float = 0.6

    def __post_init__(self) -> None:
        require_epochs(self.loop, "loop")
        self.template_strength = check_strength(self.template_strength)  # 1 and 1.0: one store fingerprint

    def folder(self, run_dir: str) -> Path:
        """Where the model is exported, absolute: ``<run_dir>/controlnet``."""
        return (Path(run_dir) / RUN).absolute()


def diffusion_validation(net, items: dict[str, Any], device, seed: int, max_slices: int = 64,
                         batch_size: int = 16) -> dict[str, float]:
    """Mean diffusion MSE of ``net`` on the first ``max_slices`` of ``items`` (``inpainting_arrays``),
    each slice at its own fixed timestep (evenly spread over the schedule) and seeded noise, no caption
    dropout."""
    import torch

    n = min(max_slices, len(items["image"]))
    timesteps = torch.linspace(0, net.cfg.num_train_timesteps - 1, max(n, 1)).long()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            batch = {k: torch.as_tensor(np.array(items[k][start:stop], np.float32), device=device)
                     for k in ("image", "condition")}
            batch["caption"] = list(items["caption"][start:stop])
            loss = net.training_loss(batch, generator, timesteps[start:stop], caption_dropout=0.0)["diffusion"]
            total += float(loss) * (stop - start)
    return {"val_diffusion": total / n} if n else {}


def controlnet_baseline_worker(config: dict[str, Any]) -> None:
    """Ray Train worker of the ControlNet baseline (``config["model"]``: the resolved model config)."""
    import torch

    from engine.models.controlnet_baseline import ControlNetBaseline
    from engine.models.generator import GeneratorConfig
    from engine.training.checkpoint import export_model
    from engine.training.datasets import InpaintingDataset, collate
    from engine.training.distributed import prepare
    from engine.training.generator import generator_data_config
    from engine.training.loop import train_epochs
    from engine.training.runner import worker_setup
    from engine.training.vae import load_vae

    setup = worker_setup(config, ControlNetBaselineStageConfig)
    ctx, stage, rank, device = setup.ctx, setup.stage, setup.rank, setup.device
    model_cfg = GeneratorConfig.from_dict(config["model"])
    data_cfg = generator_data_config(setup.data, model_cfg)
    train, val = setup.arrays["train"], setup.arrays["val"]
    net = ControlNetBaseline(model_cfg, vae=load_vae(config["vae_folder"])[0]).to(device)
    model = prepare(net)
    generator = torch.Generator(device="cpu").manual_seed(stage.loop.seed * 1000 + rank)

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        return {"loss": model(batch, generator)["loss"]}

    def validate() -> dict[str, float]:
        return {} if val is None else diffusion_validation(net, val, device, stage.loop.seed)

    trained = net.trained_parts()
    train_epochs(
        ctx=ctx, loop=stage.loop, models=dict(trained.items()), parameters=list(trained.parameters()),
        dataset=InpaintingDataset(train, data_cfg, train=True, seed=stage.loop.seed), step_fn=step,
        validate_fn=validate, collate_fn=collate,
        config={"stage": config["stage"], "data": config["data"], "model": config["model"]},
    )
    if rank == 0:
        export_model(stage.folder(ctx.run_dir), MODEL_NAME, trained, {
            "model": config["model"], "baseline": stage.model.to_dict(), "vae_folder": config["vae_folder"],
            "input_range": "-1,1", "crop_size": data_cfg.crop_size})


def train_controlnet_baseline(cfg) -> dict[str, Any]:
    """Driver of the ControlNet baseline stage; its final metrics."""
    from engine.models.vae import VAEConfig
    from engine.training.checkpoint import read_model_config
    from engine.training.data import inpainting_arrays
    from engine.training.generator import generator_data_config
    from engine.training.prepare import prepare_arrays
    from engine.training.runner import launch

    stage: ControlNetBaselineStageConfig = cfg.controlnet_baseline
    vae_folder = cfg.vae.folder(cfg.run_dir)
    if not (Path(vae_folder) / "vae.json").is_file():
        raise ValueError(f"{vae_folder}: no trained VAE (vae.json); run `lgesynth train vae` first or set vae.pretrained")
    model_cfg = stage.model.resolve(cfg.generator.model, VAEConfig.from_dict(read_model_config(vae_folder, "vae")["model"]))
    parts, _ = prepare_arrays(cfg)
    if not parts["train"].positive.any():
        raise ValueError(f"{cfg.cohort.root}: the train patients have no positive slice to train the ControlNet baseline on")
    data_cfg = generator_data_config(cfg.data, model_cfg)
    val = inpainting_arrays(parts["val"], data_cfg) if parts["val"].positive.any() else None
    return launch(cfg, stage, controlnet_baseline_worker, name=RUN,
                  arrays={"train": inpainting_arrays(parts["train"], data_cfg), "val": val},
                  extra={"model": model_cfg.to_dict(), "vae_folder": str(vae_folder)}, ignore_changes=SAMPLING_KEYS,
                  export=stage.folder(cfg.run_dir) / f"{MODEL_NAME}.json")
