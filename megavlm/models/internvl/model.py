"""InternVL: InternViT -> pixel shuffle + LayerNorm + MLP -> image embeddings at <image>
positions -> a Qwen2- or Llama-style decoder.

The composition is LLaVA's (models/llava/model.py): the family differs in its parts, which the
config selects in models/common/layer_specs.py: the ViT layer with full-width QK-norm and
LayerScale (vision.py here), the pixel-shuffle connector (connectors/pixel_shuffle.py), QKV
biases and RoPE theta in the decoder. Dynamic-resolution tiles reach the model as more images:
every tile of a sample is one ViT input whose tokens fill its share of the <image> positions
(data/tiles.py).
"""
from __future__ import annotations

from megavlm.models.llava.model import LlavaModel


class InternVLModel(LlavaModel):
    """LLaVA's composition; the InternVL parts come from the config (see above)."""
