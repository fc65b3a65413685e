"""Checkpoint formats other than the native one, each read into (and written from) a
:class:`~noisecraft.models.latent_diffusion.LatentDiffusion`.

Weight names are data: each model component's key-rule tables are in :mod:`.keys` (applied
by the one mapper of :mod:`noisecraft.key_rules`); a container format says which table each
part of a file uses. A new model family or layout is new tables.

* Original CompVis / AUTOMATIC1111 single files (``.safetensors`` / ``.ckpt``), SD 1.x and
  2.x: :mod:`.single_file` (public names); :mod:`.ldm_layout` (prefixes and tables),
  :mod:`.detect` (other kinds refused, configs; :mod:`.infer_config`), :mod:`.prediction`,
  :mod:`.single_file_read`, :mod:`.single_file_write`, :mod:`.single_file_meta`,
  :mod:`.vae_file`.
* diffusers pipeline folders (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``): :mod:`.diffusers_folder` (public names); :mod:`.diffusers_read`,
  :mod:`.diffusers_write`, :mod:`.diffusers_configs` (each ``config.json``),
  :mod:`.diffusers_tokenizer`, :mod:`.diffusers_files`.
* :mod:`.auto`: which format a path holds, loading any, converting between them.
* TAESD tiny decoders (original files and diffusers ``AutoencoderTiny``): :mod:`.taesd`, read
  into a :class:`~noisecraft.models.tiny_decoder.TinyDecoder` for
  :func:`noisecraft.io.native.load_tiny_decoder`.
"""
