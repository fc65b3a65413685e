"""Adapters: files that patch a loaded model and never fork it (LoRA, textual inversion).

They sit below pipelines/ and above io/ in the layers: an adapter reads its file through
io/ and changes a models/ object in place, restorably.

LoRA (Hu et al. 2021): :mod:`.lora_module` (one layer's low-rank change),
:mod:`.lora_keys` (the layers a LoRA may patch and the names files give them),
:mod:`.lora_files` (kohya / A1111 and diffusers / PEFT files), :mod:`.lora_merge` (several
LoRAs merged into the weights, restored bit for bit), :mod:`.lora_train` (trainable,
unmerged LoRA layers).
"""

from noisecraft.adapters.lora_files import (
    LoRAFile,
    LoRAModules,
    lora_modules_of,
    read_lora,
    write_kohya_lora,
)
from noisecraft.adapters.lora_keys import lora_targets
from noisecraft.adapters.lora_merge import AppliedLoRA, MergedLoRAs
from noisecraft.adapters.lora_module import LoRAModule
from noisecraft.adapters.lora_train import TrainableLoRA, add_trainable_lora

__all__ = [
    "AppliedLoRA",
    "LoRAFile",
    "LoRAModule",
    "LoRAModules",
    "MergedLoRAs",
    "TrainableLoRA",
    "add_trainable_lora",
    "lora_modules_of",
    "lora_targets",
    "read_lora",
    "write_kohya_lora",
]
