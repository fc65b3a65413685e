"""The public Python API: ``noisecraft.load(...)`` -> :class:`Pipeline` -> images.

Every surface (the CLI, the HTTP server, the web page, notebooks) is a thin shell over this
package; the generation policy lives here (:mod:`noisecraft.api.pipeline`) and in the
loading options (:mod:`noisecraft.api.loading`).
"""

from noisecraft.api.controls import Control
from noisecraft.api.loading import load
from noisecraft.api.observed import AttentionMaps, Observed
from noisecraft.api.options import LoadOptions
from noisecraft.api.pipeline import Pipeline
from noisecraft.api.result import GenerationResult
from noisecraft.pipelines.observe import Observer

__all__ = [
    "AttentionMaps",
    "Control",
    "GenerationResult",
    "LoadOptions",
    "Observed",
    "Observer",
    "Pipeline",
    "load",
]
