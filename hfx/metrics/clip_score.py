"""CLIP score (Hessel et al. 2021): how well an image matches a caption, ``100 * max(cos(image, text), 0)``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from hfx.metrics.extractors import OpenClipFeatureExtractor


def clip_score_from_embeddings(image_embeds, text_embeds) -> torch.Tensor:
    """Per-pair CLIP score ``[B]`` from image and text embeddings ``[B, E]`` (need not be normalised)."""
    image_embeds, text_embeds = torch.as_tensor(image_embeds), torch.as_tensor(text_embeds)
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"image and text embeddings must both be [B, E], got {tuple(image_embeds.shape)} and "
                         f"{tuple(text_embeds.shape)}")
    cosine = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=1)
    return 100 * cosine.clamp(min=0)


class CLIPScore(nn.Module):
    """``clip_score(images, texts) -> [B]`` with an open_clip model built offline.

    Args:
        model_name: open_clip architecture (``"ViT-B-32"``) or ``"local-dir:/path"``.
        weights: local weights file for a named architecture; ``None``: random weights (warns).
        images: anything :func:`hfx.metrics.extractors.to_pixels` accepts; texts: one caption per image.
    """

    def __init__(self, model_name: str, weights: str | os.PathLike | None = None):
        super().__init__()
        import open_clip

        self.image_tower = OpenClipFeatureExtractor(model_name, weights)
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def describe(self) -> dict[str, object]:
        return self.image_tower.describe()

    @torch.no_grad()
    def forward(self, images, texts: Sequence[str]) -> torch.Tensor:
        image_embeds = self.image_tower(images)["features"]
        if len(texts) != image_embeds.shape[0]:
            raise ValueError(f"got {image_embeds.shape[0]} images and {len(texts)} texts: one caption per image")
        tokens = self.tokenizer(list(texts)).to(self.image_tower.device)
        return clip_score_from_embeddings(image_embeds, self.image_tower.model.encode_text(tokens))
