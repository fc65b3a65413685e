"""Training: configs, in-memory datasets, EMA, the Trainer loop, its tasks, DDP helpers.

``trainer.Trainer`` is the generic loop; ``tasks`` holds what it can train (pixel diffusion,
the VAE of latent diffusion, text-conditioned latent diffusion); ``captions`` turns class
labels into prompts for the text-conditioned task.
"""
