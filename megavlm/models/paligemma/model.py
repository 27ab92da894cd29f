"""PaliGemma: SigLIP -> linear projector -> image embeddings at <image> positions -> Gemma.

LLaVA's composition (models/llava/model.py); the PaliGemma parts come from the config: SigLIP's
ViT options, the linear connector, the Gemma decoder (models/common/language_model.py) and the
prefix-LM attention (``model.prefix_lm``: each batch brings its samples' prefix lengths, and
VLMBase turns them into the mask, models/common/prefix_lm.py).
"""
from __future__ import annotations

from megavlm.models.llava.model import LlavaModel


class PaliGemmaModel(LlavaModel):
    """LLaVA's composition; the PaliGemma parts come from the config (see above)."""
