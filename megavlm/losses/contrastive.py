"""Two-tower contrastive objectives over the global batch: CLIP's InfoNCE and SigLIP's pairwise
sigmoid loss. Each holds its learned logit scale (and SigLIP's bias).

Embeddings arrive L2-normalised, [local rows, E]. The other ranks' rows are gathered over the
data-parallel group *with* gradients (losses/gather.py), so every sample's negatives are the
micro-batches of all data-parallel ranks (as in CLIP: the local batch of every worker) and each
rank's loss reaches every rank's towers. Each rank returns the loss *sum* over its own rows;
summed over ranks and divided by their number (the trainer's per-sample normalisation) this is
exactly the single-process loss over the ranks' micro-batches put together:

* clip:   mean over samples of (CE(image -> all texts) + CE(text -> all images)) / 2
* siglip: mean over images of sum over all texts of -log sigmoid(z_ij (t x_i . y_j + b)),
          z = +1 for the matching pair, -1 otherwise
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megavlm.losses.gather import gather_rows_with_grad


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, group=None) -> torch.Tensor:
    """InfoNCE, both directions: sum over this rank's rows of (CE_i2t + CE_t2i) / 2."""
    image_all, start = gather_rows_with_grad(image, group)
    text_all, _ = gather_rows_with_grad(text, group)
    targets = torch.arange(start, start + image.shape[0], device=image.device)
    i2t = scale * image.float() @ text_all.float().t()
    t2i = scale * text.float() @ image_all.float().t()
    return (F.cross_entropy(i2t, targets, reduction="sum") + F.cross_entropy(t2i, targets, reduction="sum")) / 2


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 group=None) -> torch.Tensor:
    """SigLIP: every (local image, global text) pair once; each pair of the global batch is
    counted on exactly one rank (its image's)."""
    text_all, start = gather_rows_with_grad(text, group)
    logits = scale * image.float() @ text_all.float().t() + bias
    signs = -torch.ones_like(logits)
    rows = torch.arange(image.shape[0], device=image.device)
    signs[rows, start + rows] = 1.0
    return -F.logsigmoid(signs * logits).sum()


class _Objective(torch.nn.Module):
    """The learned scale t = exp(logit_scale), clamped to ``max_scale`` (CLIP keeps t <= 100).
    Stored as a 1-element vector so the optimizer treats it like a bias (no weight decay)."""

    name = ""

    def __init__(self, logit_scale_init: float, max_scale: float | None):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor([logit_scale_init]))
        self.max_log_scale = math.log(max_scale) if max_scale is not None else None

    def scale(self) -> torch.Tensor:
        if self.max_log_scale is not None:
            with torch.no_grad():
                self.logit_scale.clamp_(max=self.max_log_scale)
        return self.logit_scale.float().exp()

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[images, texts] scaled similarities (the HF models' logits_per_image)."""
        return self.scale() * image.float() @ text.float().t()


class ClipObjective(_Objective):
    name = "clip"

    def forward(self, image: torch.Tensor, text: torch.Tensor, group=None) -> dict:
        return {self.name: (clip_loss(image, text, self.scale(), group), image.shape[0])}


class SigmoidObjective(_Objective):
    name = "siglip"

    def __init__(self, logit_scale_init: float, max_scale: float | None, logit_bias_init: float):
        super().__init__(logit_scale_init, max_scale)
        self.logit_bias = torch.nn.Parameter(torch.tensor([logit_bias_init]))

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return super().logits(image, text) + self.logit_bias.float()

    def forward(self, image: torch.Tensor, text: torch.Tensor, group=None) -> dict:
        loss = sigmoid_loss(image, text, self.scale(), self.logit_bias.float(), group)
        return {self.name: (loss, image.shape[0])}


def build_objective(contrastive) -> _Objective:
    """The objective ``contrastive.loss`` names, with its learned scale (and bias)."""
    if contrastive.loss == "clip":
        return ClipObjective(contrastive.logit_scale_init, contrastive.max_logit_scale)
    return SigmoidObjective(contrastive.logit_scale_init, contrastive.max_logit_scale, contrastive.logit_bias_init)
