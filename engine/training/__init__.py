"""Training infrastructure shared by every model: safetensors checkpoints and the Ray Train harness."""
