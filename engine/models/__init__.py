"""Networks of the engine, one file per model: reward, VAE, inpainting UNet, ControlNet, text encoder, downstream."""
