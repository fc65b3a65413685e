"""Checkpoint formats other than the native one, each read into (and written from) a
:class:`~noisecraft.models.latent_diffusion.LatentDiffusion`:

* :mod:`.single_file`: original CompVis / AUTOMATIC1111 single files (``.safetensors`` /
  ``.ckpt``), SD 1.x and 2.x.
* :mod:`.diffusers_folder`: diffusers pipeline folders (``unet/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``).
"""
