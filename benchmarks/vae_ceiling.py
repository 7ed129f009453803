"""What the VAE leaves the generator: latent scale and the reward filter on VAE reconstructions.

For a run with a trained VAE and reward model, on the val positive slices (generator crops):
the std of the unscaled latents (``scaling_factor`` should be its inverse), and the reward model's
mean Dice and pass rate on the real images, on their VAE reconstructions, and on the real images
with only the scar region (the inpainting mask) replaced by the reconstruction. The last is the
ceiling of any latent inpainting generator on this VAE.

Usage: python benchmarks/vae_ceiling.py --run runs/demo [--config configs/phantom.yaml] [--limit 64]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run_dir holding vae/, reward/ and splits.json")
    parser.add_argument("--config", default="configs/phantom.yaml")
    parser.add_argument("--limit", type=int, default=64, help="val positive slices used")
    parser.add_argument("--threshold", type=float, default=0.6)
    args = parser.parse_args()

    import torch

    from engine.config import load_config
    from engine.evaluation.metrics import dice_per_sample, pass_rate
    from engine.models.vae import decode_latents, encode_latents
    from engine.settings import EngineConfig
    from engine.training.data import inpainting_arrays
    from engine.training.generator import generator_data_config, load_reward_model
    from engine.training.prepare import prepare_arrays
    from engine.training.vae import load_vae

    cfg = load_config(EngineConfig, args.config, [f"run_dir={args.run}"])
    parts, _ = prepare_arrays(cfg)
    pos = inpainting_arrays(parts["val"], generator_data_config(cfg.data, cfg.generator.model))
    vae, vae_cfg = load_vae(cfg.vae.folder(cfg.run_dir))
    reward, _ = load_reward_model(cfg.run_dir)
    x = torch.as_tensor(np.asarray(pos["image"][: args.limit], np.float32))
    mask = torch.as_tensor(np.asarray(pos["mask"][: args.limit], np.float32))
    scar = np.asarray(pos["scar"][: args.limit])[:, 0] > 0.5
    with torch.no_grad():
        z = encode_latents(vae, x, 1.0)
        print(f"{len(x)} val positive slices; unscaled latent std {float(z.std()):.3f} "
              f"(1/std {1 / float(z.std()):.4f}; vae.json scaling_factor {vae_cfg.scaling_factor:.4f})")
        recon = decode_latents(vae, z, 1.0).clamp(-1, 1)
        for name, image in (("real", x), ("VAE reconstruction", recon), ("real, scar region reconstructed", mask * recon + (1 - mask) * x)):
            predicted = (torch.sigmoid(reward(image)[:, :1]) > 0.5).numpy()[:, 0]
            dice = dice_per_sample(predicted, scar)
            print(f"{name}: mean scar Dice {dice.mean():.3f}, pass rate {pass_rate(dice, args.threshold):.3f}")


if __name__ == "__main__":
    main()
