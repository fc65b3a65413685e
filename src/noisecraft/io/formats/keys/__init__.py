"""Key-rule tables, one module per model component (applied by :mod:`noisecraft.key_rules`):

* :mod:`.unet`: the U-Net: LDM names (ours) as they are in single files; diffusers'
  ``UNet2DConditionModel`` names, a table built from the config;
* :mod:`.vae`: the KL autoencoder: LDM names (ours), Linear-shaped attention accepted;
  diffusers' ``AutoencoderKL`` names (the table of :mod:`noisecraft.models.vae_keys`);
* :mod:`.clip`: a CLIP text encoder (SD 1.x's CLIP-L) in transformers' ``CLIPTextModel``
  names, with or without ``text_model.``;
* :mod:`.openclip`: SD 2.x's OpenCLIP text tower (``resblocks``, q / k / v packed in
  ``in_proj``).

The containers (a single file's prefixes, a diffusers folder's sub-folders) say which table
each part of a file uses: :mod:`..ldm_layout`, :mod:`..diffusers_read`,
:mod:`..diffusers_write`.
"""
