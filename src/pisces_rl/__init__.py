"""pisces_rl: RL post-training of text-to-video diffusion models with PISCES OT-aligned rewards."""
__version__ = "0.1.0"
