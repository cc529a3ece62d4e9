"""``hfx space``: a Gradio app (a Hugging Face Space) for a saved artifact.

:func:`build_space` finds the artifact's kind (:func:`~hfx.space.kinds.detect_kind`: a pipeline's
``_class_name``, a classifier's ``hfx_preprocessing.json``, an adapter's ``task_type``, a model's type or
architecture), asks the kind's function in :data:`SPACE_KINDS` for its app and writes the Space folder
(:func:`write_space`: ``app.py``, ``requirements.txt``, ``README.md`` with ``sdk: gradio``, the artifact in
``model/``); :func:`push_space` uploads it through ``hfx push``'s publishing code. The apps import
:mod:`hfx.space.runtime` (plumbing) and the public hfx, diffusers and transformers APIs.
"""

from hfx.space.kinds import SPACE_KINDS, Artifact, SpaceApp, detect_kind
from hfx.space.writer import build_space, push_space, render_app, resolve_source, write_space

__all__ = ["SPACE_KINDS", "Artifact", "SpaceApp", "build_space", "detect_kind", "push_space", "render_app",
           "resolve_source", "write_space"]
