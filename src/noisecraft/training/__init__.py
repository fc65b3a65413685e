"""Training: configs, in-memory datasets, EMA, the Trainer loop, DDP helpers."""
