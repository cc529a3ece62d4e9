"""What the apps written by ``hfx space`` import at run time (they run where hfx is installed: a Space
installs it from its ``requirements.txt``). Plumbing only; each app's model calls stay in its ``app.py``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# One row of the guidance table `hfx demo` adds to a pipeline's card (hfx.demo.results_table):
# | guidance | variant | conditional accuracy | FID | KID (x1e3) |
_GUIDANCE_ROW = re.compile(r"^\|\s*(?P<guidance>\d+(?:\.\d+)?)\s*\|\s*(?P<variant>[^|]*?)\s*\|\s*"
                           r"(?P<accuracy>\d+(?:\.\d+)?)\s*%\s*\|\s*(?P<fid>\d+(?:\.\d+)?)\s*\|")


def artifact_folder(model: str, app_file: str) -> str:
    """The folder of an app's artifact: ``model`` beside ``app_file`` when that folder exists (the copy
    ``hfx space`` made), else the Hub repo id ``model``, downloaded (``snapshot_download``, cached)."""
    local = Path(app_file).resolve().parent / model
    if local.is_dir():
        return str(local)
    from huggingface_hub import snapshot_download

    return snapshot_download(model)


def guidance_curve(folder: str | Path) -> list[dict]:
    """The guidance measurements in a pipeline's model card (``README.md``, the table ``hfx demo`` writes):
    one ``{"guidance", "variant", "accuracy" (%), "fid"}`` per row, in card order; ``[]`` when there are none."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return []
    rows = (_GUIDANCE_ROW.match(line.strip()) for line in card.read_text(encoding="utf-8").splitlines())
    return [{"guidance": float(m["guidance"]), "variant": m["variant"], "accuracy": float(m["accuracy"]),
             "fid": float(m["fid"])} for m in rows if m]


def to_pixels(image: Image.Image, size: int, mode: str) -> torch.Tensor:
    """A PIL image -> (1, C, size, size) float pixels in [-1, 1] (``mode`` "L" or "RGB"; bilinear resize)."""
    image = image.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return (array[None] if array.ndim == 2 else array.permute(2, 0, 1))[None]


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) pixels in [-1, 1] -> B PIL images (grey for one channel)."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]


def drawing_to_image(drawing: dict | Image.Image | None, light_ink: bool = True) -> Image.Image:
    """A ``gr.Sketchpad`` value (its ``composite``, RGBA) -> a grey image of the strokes: light strokes on black
    when ``light_ink`` (the digits hfx trains on look like that), else dark strokes on white.

    Raises:
        ValueError: nothing was drawn.
    """
    composite = drawing.get("composite") if isinstance(drawing, dict) else drawing
    if composite is None:
        raise ValueError("draw something first")
    rgba = composite.convert("RGBA")
    # Over white, a stroke is dark; its ink is how much darker than white it made the pixel.
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    grey = np.asarray(Image.alpha_composite(white, rgba).convert("L"), dtype=np.uint8)
    if (grey == 255).all():
        raise ValueError("the drawing is empty: draw something first")
    return Image.fromarray(255 - grey if light_ink else grey)
