"""Stage: train the one-channel VAE (the latent space of the generator) on real LGE slices.

All train-patient slices, images mapped to [-1, 1]; validated by reconstruction L1 and SSIM on the
val patients. Exported to ``<run_dir>/vae/vae.safetensors`` + ``vae.json``. Users with a pretrained
one-channel VAE set ``vae.pretrained`` to its folder (``vae.safetensors`` + ``vae.json``) and skip
the stage: the generator stage reads whichever folder is configured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.models.vae import VAEConfig
from engine.training.distributed import RayTrainConfig
from engine.training.loop import TrainLoopConfig, require_epochs

STAGE = "vae"


@dataclass
class VAEStageConfig:
    """Args:
        model: the autoencoder.
        loop: epochs, batch size, optimizer.
        ray: workers and resources.
        kl_weight: weight of the KL term (LDM: 1e-6).
        mse_weight: weight of an extra squared-error term.
        pretrained: folder holding an exported ``vae.safetensors`` + ``vae.json`` to use instead of
            training (empty: ``<run_dir>/vae``, written by this stage).
        scaling_images: train images whose latents set the exported ``model.scaling_factor`` to
            ``1 / std`` after training (the LDM recipe); 0 keeps ``model.scaling_factor`` as configured.
    """

    model: VAEConfig = field(default_factory=VAEConfig)
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=20, batch_size=16, lr=1e-3))
    ray: RayTrainConfig = field(default_factory=RayTrainConfig)
    kl_weight: float = 1e-6
    mse_weight: float = 0.0
    pretrained: str = ""
    scaling_images: int = 512

    def __post_init__(self) -> None:
        require_epochs(self.loop, "loop")
        if self.kl_weight < 0 or self.mse_weight < 0:
            raise ValueError("kl_weight and mse_weight must be >= 0")
        if self.scaling_images < 0:
            raise ValueError(f"scaling_images must be >= 0, got {self.scaling_images}")

    def folder(self, run_dir: str) -> Path:
        """Where the generator stage reads the VAE from, absolute (Ray workers run in other folders)."""
        return (Path(self.pretrained) if self.pretrained else Path(run_dir) / STAGE).absolute()


def load_vae(folder: str | Path):
    """The exported VAE of ``folder`` (weights verified by sha256), frozen and in eval mode."""
    from engine.models.vae import build_vae
    from engine.training.checkpoint import load_model_weights, read_model_config

    config = VAEConfig.from_dict(read_model_config(folder, STAGE)["model"])
    vae = build_vae(config)
    load_model_weights(folder, STAGE, vae)
    return vae.eval().requires_grad_(False), config


def vae_worker(config: dict[str, Any]) -> None:
    """Ray Train worker of the VAE stage."""
    import numpy as np
    import torch

    from engine.evaluation.metrics import ssim
    from engine.models.vae import build_vae, measure_scaling_factor, vae_loss
    from engine.training.checkpoint import export_model
    from engine.training.datasets import SegmentationDataset, collate
    from engine.training.distributed import prepare
    from engine.training.loop import train_epochs
    from engine.training.runner import worker_setup

    setup = worker_setup(config, VAEStageConfig)
    ctx, stage, data_cfg, rank, device = setup.ctx, setup.stage, setup.data, setup.rank, setup.device
    train, val = setup.arrays["train"], setup.arrays["val"]
    net = build_vae(stage.model)
    model = prepare(net)

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"].to(device).clamp(0.0, 1.0) * 2.0 - 1.0
        loss, parts = vae_loss(model.module if hasattr(model, "module") else model, images,
                               stage.kl_weight, stage.mse_weight)
        return {"loss": loss, "l1": parts["l1"], "kl": parts["kl"]}

    @torch.no_grad()
    def validate() -> dict[str, float]:
        net.eval()
        x = torch.as_tensor(np.clip(val.image[:64], 0.0, 1.0), device=device) * 2.0 - 1.0
        recon = net.decode(net.encode(x).latent_dist.mode()).sample.clamp(-1.0, 1.0)
        a, b = ((x + 1) / 2).cpu().numpy(), ((recon + 1) / 2).cpu().numpy()
        return {"val_l1": float(np.abs(a - b).mean()),
                "val_ssim": float(np.mean([ssim(b[i, 0], a[i, 0], data_range=1.0) for i in range(len(a))]))}

    train_epochs(
        ctx=ctx, loop=stage.loop, models={STAGE: model}, parameters=list(model.parameters()),
        dataset=SegmentationDataset(train, data_cfg, train=True, seed=stage.loop.seed), step_fn=step,
        validate_fn=validate, collate_fn=collate, config={"stage": config["stage"], "data": config["data"]},
    )
    if rank == 0:
        model_cfg = stage.model
        if stage.scaling_images:
            net.eval()
            images = torch.as_tensor(np.clip(train.image[:stage.scaling_images], 0.0, 1.0), device=device) * 2.0 - 1.0
            model_cfg = dataclasses.replace(model_cfg, scaling_factor=measure_scaling_factor(net, images))
            net.register_to_config(scaling_factor=model_cfg.scaling_factor)
            print(f"vae: latent scaling_factor {model_cfg.scaling_factor:.4g} (1 / std over {len(images)} train slices)")
        export_model(Path(ctx.run_dir) / STAGE, STAGE, net, {"model": model_cfg.to_dict(), "input_range": "-1,1",
                                                            "crop_size": data_cfg.crop_size})


def train_vae(cfg) -> dict[str, Any]:
    """Driver of the VAE stage (refuses to train over a configured pretrained VAE)."""
    from engine.training.prepare import prepare_arrays
    from engine.training.runner import launch

    if cfg.vae.pretrained:
        raise ValueError(f"vae.pretrained is set ({cfg.vae.pretrained}): the generator uses that VAE; unset it to train one")
    parts, _ = prepare_arrays(cfg)
    return launch(cfg, cfg.vae, vae_worker, name=STAGE, arrays={"train": parts["train"], "val": parts["val"]},
                  export=Path(cfg.run_dir) / STAGE / f"{STAGE}.json")
