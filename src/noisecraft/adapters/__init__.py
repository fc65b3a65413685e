"""Adapters: files that patch a loaded model and never fork it (LoRA, textual inversion).

They sit below pipelines/ and above io/ in the layers: an adapter reads its file through
io/ and changes a models/ object in place, restorably.
"""
