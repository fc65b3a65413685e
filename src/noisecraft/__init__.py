"""noisecraft: diffusion models from the math."""

__version__ = "0.1.0"
