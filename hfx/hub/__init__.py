"""Publishing hfx artifacts: model cards (:mod:`~hfx.hub.cards`), upload to the Hub
(:mod:`~hfx.hub.publish`) and the remote-code export for users without hfx (:mod:`~hfx.hub.export`).

What an output folder is (a run folder with ``final/``, or a bare ``save_pretrained`` folder) is defined
in :mod:`~hfx.hub.artifact`. Loading by repo id needs nothing from here: ``import hfx`` then
``AutoModel.from_pretrained("user/name")`` or ``ClassConditionalPipeline.from_pretrained("user/name")``.
A training run writes its card (and pushes) through :class:`~hfx.hub.callback.HubCallback`.
"""

from hfx.hub.artifact import Output, resolve_output
from hfx.hub.callback import HubCallback
from hfx.hub.cards import card_images, load_snippet, render_card
from hfx.hub.export import export_remote_code
from hfx.hub.publish import HubAuthError, HubUnreachableError, push

__all__ = ["HubAuthError", "HubCallback", "HubUnreachableError", "Output", "card_images", "export_remote_code", "load_snippet",
           "push", "render_card", "resolve_output"]
