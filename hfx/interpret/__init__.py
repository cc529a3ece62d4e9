"""Seeing inside a model: saliency, SmoothGrad, guided backpropagation, the deconvnet, CAM, Grad-CAM,
guided Grad-CAM, attention maps and attention rollout, and receptive fields (a leaf: torch, numpy, PIL and
matplotlib only).

:func:`explain` takes a timm or transformers image classifier or a transformers text model (hfx's LM
included) as it is: the layer to explain and a ViT's token-to-grid reshape come from the model and its
config, the logits from its output. :func:`overlay` draws a heatmap over its image;
:func:`receptive_field` gives a CNN layer's field from its convolutions and pools.

Example::

    import timm
    from hfx.interpret import explain, overlay

    model = timm.create_model("resnet18", num_classes=10).eval()
    explanation = explain(model, images, method="gradcam")       # images: (B, 3, H, W), normalised
    explanation.heatmaps.shape, explanation.layer                 # (B, H, W) in [0, 1], 'layer4'
    overlay(unnormalised[0], explanation.heatmaps[0]).save("gradcam.png")
"""

from hfx.interpret.explain import METHODS, Explanation, explain, normalise
from hfx.interpret.overlay import overlay
from hfx.interpret.receptive_field import receptive_field

__all__ = ["METHODS", "Explanation", "explain", "normalise", "overlay", "receptive_field"]
