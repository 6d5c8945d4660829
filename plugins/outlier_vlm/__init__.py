"""Built-in loader ``vlm``: vision-language models through mlx-vlm (the Vision tier).

Needs the ``vision`` extra (``pip install 'outlier-runtime[vision]'``); without it, loading a
tier that selects this loader is one line naming the extra.
"""

from __future__ import annotations

from outlier_runtime import hookimpl
from outlier_vlm.loader import VLMLoader
from outlier_vlm.options import VLMOptions


@hookimpl
def register_loaders(register):
    register("vlm", VLMLoader, "mlx-vlm: a vision tower and a language model; the tier takes images.",
             options=VLMOptions)
