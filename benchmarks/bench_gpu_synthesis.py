"""GPU sampling throughput of the paper-sized generator: images/s of ``LGESynthNet.generate`` over a
batch-size sweep, and achieved TFLOP/s of one UNet + ControlNet denoising step against the GPU's peak.

The generator is built from ``--config`` (configs/paper.yaml: 128 px crops, UNet (128, 256, 512),
768-wide caption states) with random weights (throughput does not depend on them); nothing is
downloaded. The text encoder is the config's when its folder exists, else a one-layer random BERT of
the same width on the packaged tokenizer (captions are encoded once and cached, outside the timed
steps). Networks run under bf16 autocast on CUDA (float32 on CPU); ``cudnn.benchmark`` is on.

Every batch size runs in each of ``--layouts``: the weights in channels-last memory layout (what
the synthesis actors run, ``synthesis.diffusion.channels_last``) and in torch's default
(contiguous) layout. Per batch size and layout: ``generate`` is warmed up once, then timed
``--repeats`` times (median, synchronized); one denoising step (``predict_noise``: ControlNet +
UNet) is timed alone and its FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions, attention; a multiply-add is 2 FLOPs), so TFLOP/s = FLOPs / step time. ``--tiny --device cpu`` checks the script on CPU in seconds.
Batch sizes still to run are skipped once ``--budget-s`` has passed.

Usage: python benchmarks/bench_gpu_synthesis.py --out gpu_synthesis.json [--batch-sizes 1,4,16,64] [--steps 20]
       python benchmarks/bench_gpu_synthesis.py --device cpu --tiny --out /tmp/gpu_tiny.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

# Dense bf16 tensor-core peaks (TFLOP/s) by device name, first match wins; --peak-tflops overrides.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))
TINY = [  # a generator of a few hundred thousand parameters, 64 px crops
    "data.crop_size=64", "vae.model.block_out_channels=[16,32]", "vae.model.norm_num_groups=8",
    "generator.model.unet.block_out_channels=[16,32]", "generator.model.unet.layers_per_block=1",
    "generator.model.unet.attention_head_dim=8", "generator.model.unet.norm_num_groups=8",
    "generator.model.unet.cross_attention_dim=32", "generator.model.controlnet.conditioning_embedding_out_channels=[8,16]",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/paper.yaml", help="model sizes come from this config")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches (a CPU check of the script)")
    parser.add_argument("--batch-sizes", default="", help="comma-separated (default 1,4,16,64; tiny: 1,2)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per generate call (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per batch size (median)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's dense bf16 peak (default: looked up from the device name)")
    parser.add_argument("--layouts", default="channels-last,contiguous",
                        help="weight layouts to sweep, comma-separated: channels-last (the actors'), contiguous")
    parser.add_argument("--budget-s", type=float, default=180.0, help="skip remaining batch sizes after this")
    parser.add_argument("--tokenizer", default="",
                        help="folder of a BERT tokenizer for the random text encoder (default: the packaged MiniLM's)")
    parser.add_argument("--out", default="", help="write the results as JSON to this file")
    return parser.parse_args(argv)


def build_model(args):
    """The generator of ``args.config`` (or the tiny one), random weights, eval mode, on the device.

    Only the config's ``generator.model``, ``vae.model`` and ``data.crop_size`` are read (plain YAML,
    no cohort or stage imports), so the script needs torch, diffusers and transformers alone."""
    import torch
    import yaml

    from engine.config import apply_overrides, from_dict
    from engine.models.generator import GeneratorConfig, LGESynthNet
    from engine.models.text_encoder import TextEncoderConfig
    from engine.models.vae import VAEConfig

    data = apply_overrides(yaml.safe_load(Path(args.config).read_text()), TINY if args.tiny else [])
    model_cfg = from_dict(GeneratorConfig, data.get("generator", {}).get("model", {}), path="generator.model")
    vae_cfg = from_dict(VAEConfig, data.get("vae", {}).get("model", {}), path="vae.model")
    crop = int(data.get("data", {}).get("crop_size", 128))
    width = model_cfg.unet.cross_attention_dim
    wanted = model_cfg.text_encoder
    if wanted.kind == "pretrained" and wanted.path and Path(wanted.path).is_dir():
        text, text_note = wanted, f"pretrained {wanted.path}"
    else:  # no download: a random one-layer BERT as wide as the UNet's cross-attention
        text = TextEncoderConfig(kind="tiny-random", path=args.tokenizer, tiny_hidden_size=width,
                                 max_length=wanted.max_length)
        text_note = (f"random 1-layer BERT, width {width}, tokenizer {args.tokenizer or 'of the packaged MiniLM'} "
                     f"({wanted.path or 'packaged MiniLM'} not used)")
    model_cfg = dataclasses.replace(model_cfg, text_encoder=text, vae=vae_cfg)
    torch.manual_seed(0)
    model = LGESynthNet(model_cfg).eval().requires_grad_(False).to(args.device)
    return model, crop, text_note


def make_batch(model, batch_size: int, size: int, device: str) -> dict:
    """Images in [-1, 1], a ring-sector scar mask, its condition and captions (the batch contract)."""
    import torch

    from engine.models.generator import inpaint_mask

    g = torch.Generator().manual_seed(batch_size)
    image = (torch.rand(batch_size, 1, size, size, generator=g) * 2 - 1).to(device)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    scar = ((r > size * 0.2) & (r < size * 0.3) & (xx > size / 2)).float()[None, None].repeat(batch_size, 1, 1, 1)
    batch = {"image": image, "scar": scar.to(device), "mask": inpaint_mask(scar, model.cfg.mask_dilation).to(device),
             "caption": ["LGE short-axis, mid slice. Ischemic scar in the anterior wall."] * batch_size}
    batch["condition"] = model.condition(batch).to(device)
    return batch


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_inputs(model, batch: dict) -> tuple:
    """The arguments of one ``predict_noise`` call at a mid-schedule timestep, as ``generate`` makes them."""
    import torch

    with torch.no_grad():
        latents = model._encode(batch["image"])
        masked = model._encode(batch["image"] * (1.0 - batch["mask"]))
        text = model.text_states(batch["caption"])
    t = torch.full((latents.shape[0],), model.cfg.num_train_timesteps // 2, device=latents.device, dtype=torch.long)
    return torch.randn_like(latents), t, text, model.latent_mask(batch["mask"]), masked, batch["condition"]


def main(args: argparse.Namespace) -> dict:
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    begin = time.perf_counter()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --tiny to check the script)")
    torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name() if cuda else f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or next((p for key, p in PEAK_BF16_TFLOPS if cuda and key in device_name), 0.0)
    sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.tiny else "1,4,16,64")).split(",")]
    layouts = {"channels-last": torch.channels_last, "contiguous": torch.contiguous_format}
    unknown = sorted(set(args.layouts.split(",")) - set(layouts))
    if unknown:
        raise SystemExit(f"--layouts: unknown {', '.join(unknown)}; known: {', '.join(layouts)}")
    model, crop, text_note = build_model(args)
    params = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("unet", "controlnet", "vae")}
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    print(f"device: {device_name}; peak {peak or 'unknown'} TFLOP/s bf16; torch {torch.__version__}; {crop} px, "
          f"{args.steps} steps; parameters {params}; text encoder: {text_note}", flush=True)

    results = []
    for batch_size, layout in itertools.product(sizes, args.layouts.split(",")):
        model.to(memory_format=layouts[layout])
        if time.perf_counter() - begin > args.budget_s:
            print(f"{layout}, batch {batch_size}: skipped (--budget-s {args.budget_s:g} s spent)", flush=True)
            continue
        try:
            batch = make_batch(model, batch_size, crop, args.device)
            gen = [torch.Generator().manual_seed(i) for i in range(batch_size)]

            def generate(batch=batch, gen=gen):
                with autocast():
                    model.generate(batch, num_inference_steps=args.steps, generator=gen)

            generate()  # warm-up: cudnn autotuning, allocator, caption cache
            t_generate = median_seconds(generate, args.repeats, args.device)
            inputs = step_inputs(model, batch)

            def step(inputs=inputs):
                with torch.no_grad(), autocast():
                    model.predict_noise(*inputs)

            step()
            t_step = median_seconds(step, max(5, args.repeats), args.device)
            counter = FlopCounterMode(display=False)
            with counter:
                step()
            flops = counter.get_total_flops()
        except torch.cuda.OutOfMemoryError as exc:
            print(f"{layout}, batch {batch_size}: out of memory ({exc})", flush=True)
            torch.cuda.empty_cache()
            continue
        tflops = flops / t_step / 1e12
        row = {"layout": layout, "batch_size": batch_size, "generate_s": t_generate,
               "images_per_s": batch_size / t_generate,
               "step_s": t_step, "step_gflop": flops / 1e9, "step_tflops": tflops,
               "mfu": tflops / peak if peak else None,
               "steps_share_of_generate": args.steps * t_step / t_generate,
               "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        results.append(row)
        print(f"{layout}, batch {batch_size}: generate {t_generate:.3f} s = {row['images_per_s']:.1f} images/s; "
              f"one denoising step {t_step * 1e3:.2f} ms, {flops / 1e9:.3g} GFLOP = {tflops:.3g} TFLOP/s"
              + (f" ({100 * tflops / peak:.1f}% of peak)" if peak else "")
              + f"; {args.steps} steps = {100 * row['steps_share_of_generate']:.0f}% of generate", flush=True)
    report = {"device": device_name, "peak_tflops_bf16": peak or None, "config": args.config, "tiny": args.tiny,
              "crop_size": crop, "steps": args.steps, "repeats": args.repeats, "dtype": "bfloat16 autocast" if cuda
              else "float32", "text_encoder": text_note, "parameters": params, "torch": torch.__version__,
              "results": results, "wall_s": time.perf_counter() - begin}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(parse_args())
