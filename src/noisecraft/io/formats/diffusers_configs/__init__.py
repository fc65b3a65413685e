"""The ``config.json`` of each part of a diffusers folder <-> our frozen configs, one module per
part: :mod:`.unet` (``UNet2DConditionModel``), :mod:`.vae` (``AutoencoderKL``),
:mod:`.text_encoder` (transformers ``CLIPTextConfig``), :mod:`.scheduler` (the noise schedule
and prediction of ``scheduler_config.json``). Readers refuse, in one line naming the file and
the field, what our models cannot express."""
