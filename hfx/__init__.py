"""hfx: modern deep-learning methods as first-class Hugging Face ecosystem artifacts.

``import hfx`` registers, in one place (:mod:`hfx._registry`), every Auto class, PEFT method and
pipeline module hfx defines, so that ``AutoModel.from_pretrained``, ``PeftModel.from_pretrained`` and
the pipelines' ``from_pretrained`` find them. Importing hfx never touches the network.
"""

__version__ = "0.1.0"

from hfx import data  # noqa: E402
from hfx._registry import register_all  # noqa: E402

register_all()

__all__ = ["__version__", "data", "register_all"]
