"""SD2 models: UNet, VAE, OpenCLIP text encoder, their backends and checkpoint I/O."""
