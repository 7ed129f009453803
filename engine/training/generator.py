"""Stage: train the LGESynthNet generator (DOMAIN.md section 4) in two phases on Ray Train.

1. ``base``: the inpainting UNet learns to fill masked regions with enhancement, on positive slices
   (mask = the dilated scar, caption = the slice's caption), ControlNet idle: the paper trains on
   scar-positive slices only. ``base_negatives`` adds negative slices (mask = a parametric scar
   region drawn by the scar sampler, caption = "no enhancement", to be filled with healthy
   myocardium); on the demo phantom that halves what the generator learns about scar (see
   benchmarks/RESULTS.md), so it is off by default.
2. ``controlnet``: the ControlNet learns to steer the frozen base by the scar edge map (or filled
   mask), on positive slices, with the reward loss of the frozen reward model at low-noise
   timesteps; the base trains too only with ``model.train_base``.

The VAE comes from the VAE stage's folder (or a pretrained one) and the reward model from
``<run_dir>/reward``. Each phase is its own Ray Train run (``generator-base``,
``generator-controlnet``), so each resumes on its own; the weights are exported to
``<run_dir>/generator/{unet,controlnet}.safetensors`` with ``generator.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.models.generator import GeneratorConfig
from engine.training.distributed import RayTrainConfig
from engine.training.loop import TrainLoopConfig

STAGE = "generator"
PHASES = ("base", "controlnet")


@dataclass
class GeneratorStageConfig:
    """Args:
        model: the generator (its ``vae`` section is replaced by the trained VAE's config).
        base: training loop of the inpainting UNet (phase 1; ``epochs: 0`` skips it: the ControlNet
            phase then starts from the base already exported in ``<run_dir>/generator``).
        controlnet: training loop of the ControlNet (phase 2).
        ray: workers and resources (both phases).
        base_negatives: also train the base on negative slices with sampled scar-shaped masks
            (off: the paper's positives-only training).
        preview_count: validation samples generated per epoch (val pass rates).
        pass_threshold: Dice above which a generated sample passes the reward filter.
    """

    model: GeneratorConfig = field(default_factory=GeneratorConfig)
    base: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=20, batch_size=8, lr=2e-4))
    controlnet: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=20, batch_size=8, lr=1e-4))
    ray: RayTrainConfig = field(default_factory=RayTrainConfig)
    base_negatives: bool = False
    preview_count: int = 16
    pass_threshold: float = 0.6

    def __post_init__(self) -> None:
        if self.base.epochs + self.controlnet.epochs < 1:
            raise ValueError("base.epochs and controlnet.epochs are both 0: nothing to train")


def generator_data_config(data_cfg, model: GeneratorConfig):
    """The data layer's conditioning settings follow the generator's (one source of truth)."""
    return dataclasses.replace(data_cfg, condition=model.controlnet.conditioning, mask_dilation=model.mask_dilation,
                               caption_mode=model.caption_mode, edge_width=model.controlnet.edge_width)


def negative_inpainting_arrays(arrays, sampler_cfg, data_cfg, seed: int, reference_angle: float) -> dict[str, Any]:
    """Base-phase items from negative slices: a sampled scar-shaped region is masked and must be
    filled with what was there (healthy myocardium), under the slice's own "no enhancement" caption."""
    from engine.training.data import synthesis_candidates

    cand = synthesis_candidates(arrays, sampler_cfg, k=1, seed=seed, reference_angle=reference_angle, cfg=data_cfg)
    own_caption = dict(zip(arrays.source, arrays.caption))
    zeros = np.zeros_like(cand["mask"])
    return {"image": cand["image"], "mask": cand["mask"], "scar": zeros, "condition": zeros,
            "caption": [own_caption[s] for s in cand["source"]], "source": list(cand["sample_id"])}


def _concat_inpainting(parts: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("image", "mask", "scar", "condition")
    out: dict[str, Any] = {k: np.concatenate([np.asarray(p[k], np.float32) for p in parts]) for k in keys}
    out["caption"] = [c for p in parts for c in p["caption"]]
    out["source"] = [s for p in parts for s in p["source"]]
    return out


def load_reward_model(run_dir: str):
    """The exported reward model of the run, frozen (weights verified by sha256), and its record."""
    from engine.models.reward import RewardModelConfig, build_reward_model
    from engine.training.checkpoint import load_model_weights, read_model_config

    folder = Path(run_dir) / "reward"
    record = read_model_config(folder, "reward")
    model = build_reward_model(RewardModelConfig.from_dict(record["model"]))
    load_model_weights(folder, "reward", model)
    return model.eval().requires_grad_(False), record


def build_generator(model_cfg: GeneratorConfig, vae_folder: str | Path, weights_folder: str | Path | None = None):
    """An LGESynthNet on the trained VAE; with ``weights_folder``, its exported UNet/ControlNet loaded."""
    from engine.models.generator import LGESynthNet
    from engine.training.checkpoint import load_model_weights
    from engine.training.vae import load_vae

    vae, vae_cfg = load_vae(vae_folder)
    model = LGESynthNet(dataclasses.replace(model_cfg, vae=vae_cfg), vae=vae)
    if weights_folder is not None:
        for name in ("unet", "controlnet"):
            if (Path(weights_folder) / f"{name}.json").is_file():
                load_model_weights(weights_folder, name, getattr(model, name))
    return model


def generation_validation(model, reward_model, items: dict[str, Any], device, threshold: float, seed: int) -> dict[str, float]:
    """Generate from val items (image, mask, condition, scar, caption) and score them with the reward
    model: mean Dice of its predicted scar against the intended scar, and the pass rate at ``threshold``."""
    import torch

    from engine.evaluation.metrics import dice_per_sample, pass_rate

    batch = {k: torch.as_tensor(np.asarray(items[k], np.float32), device=device) for k in ("image", "mask", "condition", "scar")}
    batch["caption"] = list(items["caption"])
    generated = model.generate(batch, generator=torch.Generator(device="cpu").manual_seed(seed))
    with torch.no_grad():
        predicted = (torch.sigmoid(reward_model(generated)[:, :1].float()) > 0.5).cpu().numpy()[:, 0]
    dice = dice_per_sample(predicted, batch["scar"].cpu().numpy()[:, 0] > 0.5)
    return {"dice": float(dice.mean()), "pass_rate": float(pass_rate(dice, threshold))}


def _take(items: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] for k, v in items.items()}


def generator_worker(config: dict[str, Any]) -> None:
    """Ray Train worker of one generator phase (``config["phase"]``)."""
    import torch

    from engine.training.checkpoint import export_model
    from engine.training.datasets import InpaintingDataset, collate
    from engine.training.distributed import prepare
    from engine.training.loop import train_epochs
    from engine.training.runner import worker_setup

    phase = config["phase"]
    setup = worker_setup(config, GeneratorStageConfig, loop=phase)
    ctx, stage, rank, device = setup.ctx, setup.stage, setup.rank, setup.device
    loop = getattr(stage, phase)
    data_cfg = generator_data_config(setup.data, stage.model)
    items, val_pos, val_neg = (setup.arrays[k] for k in ("train", "val_positive", "val_negative"))
    model_cfg = dataclasses.replace(stage.model, train_base=True) if phase == "base" else stage.model
    out_dir = Path(ctx.run_dir) / STAGE
    net = build_generator(model_cfg, config["vae_folder"], out_dir if phase == "controlnet" else None)
    if phase == "base":
        net.controlnet.requires_grad_(False)
    elif not (out_dir / "controlnet.json").is_file():
        net.init_controlnet_from_unet()  # start the ControlNet from the trained base, as a no-op
    net.to(device)
    reward_model = None
    if phase == "controlnet":
        reward_model = load_reward_model(ctx.run_dir)[0].to(device)
    model = prepare(net)
    parameters = [p for p in net.parameters() if p.requires_grad]
    generator = torch.Generator(device="cpu").manual_seed(loop.seed * 1000 + rank)

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        out = model(batch, reward_model, generator)
        return {"loss": out["loss"], "diffusion": out["diffusion"], "reward": out["reward"]}

    def validate() -> dict[str, float]:
        if reward_model is None:
            return {}
        metrics = {}
        for name, items_ in (("val_positive", val_pos), ("val_negative", val_neg)):
            if items_ is not None and len(items_["image"]):
                result = generation_validation(net, reward_model, _take(items_, stage.preview_count), device,
                                               stage.pass_threshold, loop.seed)
                metrics.update({f"{name}_dice": result["dice"], f"{name}_pass_rate": result["pass_rate"]})
        return metrics

    # checkpoints hold what trains (the frozen VAE and text encoder are not copied into every one)
    trained = {"unet": net.unet} if phase == "base" else {"controlnet": net.controlnet}
    if phase == "controlnet" and stage.model.train_base:
        trained["unet"] = net.unet
    train_epochs(
        ctx=ctx, loop=loop, models=trained, parameters=parameters,
        dataset=InpaintingDataset(items, data_cfg, train=True, seed=loop.seed), step_fn=step, validate_fn=validate,
        collate_fn=collate, config={"stage": config["stage"], "data": config["data"], "phase": phase},
    )
    if rank == 0:
        record = {"model": stage.model.to_dict(), "vae_folder": str(config["vae_folder"]), "input_range": "-1,1",
                  "crop_size": data_cfg.crop_size, "phase": phase}
        export_model(out_dir, "unet", net.unet, record)
        if phase == "controlnet":
            export_model(out_dir, "controlnet", net.controlnet, record)


def train_generator(cfg) -> dict[str, Any]:
    """Driver: both phases in turn (a phase with ``epochs: 0`` is skipped); final metrics of the last."""
    from engine.training.data import inpainting_arrays, select, synthesis_candidates
    from engine.training.prepare import prepare_arrays
    from engine.training.runner import launch

    stage: GeneratorStageConfig = cfg.generator
    vae_folder = cfg.vae.folder(cfg.run_dir)
    if not (Path(vae_folder) / "vae.json").is_file():
        raise ValueError(f"{vae_folder}: no trained VAE (vae.json); run `lgesynth train vae` first or set vae.pretrained")
    if not (Path(cfg.run_dir) / "reward" / "reward.json").is_file():
        raise ValueError(f"{Path(cfg.run_dir) / 'reward'}: no trained reward model; run `lgesynth train reward` first")
    if stage.base.epochs == 0 and not (Path(cfg.run_dir) / STAGE / "unet.json").is_file():
        raise ValueError(f"generator.base.epochs is 0 but {Path(cfg.run_dir) / STAGE} holds no exported base (unet.json) "
                         "to train the ControlNet on; train the base first")
    parts, _ = prepare_arrays(cfg)
    data_cfg = generator_data_config(cfg.data, stage.model)
    angle = cfg.cohort.reference_angle
    positives = inpainting_arrays(parts["train"], data_cfg)
    val_positive = inpainting_arrays(parts["val"], data_cfg) if parts["val"].positive.any() else None
    val_neg = select(parts["val"], ~parts["val"].positive)
    val_negative = synthesis_candidates(val_neg, cfg.scar_sampler, k=1, seed=stage.controlnet.seed,
                                        reference_angle=angle, cfg=data_cfg) if len(val_neg) else None
    metrics: dict[str, Any] = {}
    for phase in PHASES:
        loop = stage.base if phase == "base" else stage.controlnet
        if loop.epochs == 0:
            continue
        train_items = positives
        if phase == "base" and stage.base_negatives:
            negatives = select(parts["train"], ~parts["train"].positive)
            if len(negatives):
                train_items = _concat_inpainting(
                    [positives, negative_inpainting_arrays(negatives, cfg.scar_sampler, data_cfg, loop.seed, angle)])
        metrics = launch(cfg, stage, generator_worker, name=f"{STAGE}-{phase}",
                         arrays={"train": train_items, "val_positive": val_positive, "val_negative": val_negative},
                         extra={"phase": phase, "vae_folder": str(vae_folder)},
                         # each phase is its own run: the other phase's loop settings are not its config
                         ignore_changes=("stage.controlnet.*",) if phase == "base" else ("stage.base.*",),
                         export=Path(cfg.run_dir) / STAGE / ("unet.json" if phase == "base" else "controlnet.json"), loop=loop)
    return metrics
