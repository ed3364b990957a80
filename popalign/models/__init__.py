"""Loading SDXL components (UNet, scheduler, frozen reference, LoRA) and tiny test pipelines."""
