"""The end of a training run, seen from the Hub: render the model card and optionally push.

Every run gets a ``HubCallback`` (the engine, which sits below ``hfx.hub`` and may not import it, finds it
in ``hfx._registry.DEFAULT_TRAIN_CALLBACKS``); pass your own to push:
``train(config, callbacks=[HubCallback(push_to_hub="user/name")])``. It runs after the final artifact and
``results.json`` are written, on the main process only.
"""

from __future__ import annotations

import logging
import shlex
import sys
from typing import Any

from hfx.trainers.callbacks import Callback

logger = logging.getLogger(__name__)


class HubCallback(Callback):
    """Render ``final/README.md`` with :func:`hfx.hub.render_card` at the end of a run, then push the run
    to ``push_to_hub`` (a repo id) when given.

    Args:
        push_to_hub: repo id to push to after the card is written; ``None`` to only write the card.
        private: create the repo private.
        revision: branch to push to.
        **facts: card facts (see :data:`hfx.hub.cards.FACT_KEYS`) on top of what the run provides: the
            facts the task's ``card_facts(metrics)`` returned, which the engine keeps in ``results.json`` (the
            summary, the Hub task type, for instance ``eval_num_samples`` of a sample-based metric), and the command.
    """

    def __init__(self, push_to_hub: str | None = None, private: bool = False, revision: str | None = None,
                 **facts: Any):
        from hfx.hub.cards import FACT_KEYS

        unknown = sorted(set(facts) - set(FACT_KEYS))
        if unknown:
            raise ValueError(f"unknown card facts {unknown}; known: {', '.join(sorted(FACT_KEYS))}")
        self.push_to_hub, self.private, self.revision, self.facts = push_to_hub, private, revision, facts
        self.card_path = None
        self.commit_url: str | None = None

    def on_train_end(self, state, control) -> None:
        if not state.is_main_process:
            return
        from hfx.hub.cards import render_card
        from hfx.hub.publish import push

        # What the task says of its artifact (summary, Hub task type) is in results.json, which the card reads.
        facts = {"command": _command_line(), **self.facts}
        try:
            self.card_path = render_card(state.output_dir, **facts)
        except FileNotFoundError as err:  # an artifact kind the Hub layer does not know (a custom task's)
            if self.push_to_hub:
                raise
            logger.warning("no model card written: %s", err)
            return
        logger.info("wrote the model card %s", self.card_path)
        if self.push_to_hub:
            self.commit_url = push(state.output_dir, self.push_to_hub, private=self.private, revision=self.revision)
            logger.info("pushed %s to %s", state.output_dir, self.commit_url)


def _command_line() -> str:
    """The command that started this process, as a user would type it (``hfx train ...``)."""
    argv = list(sys.argv)
    if not argv:
        return "not recorded"
    if argv[0].endswith(("hfx", "__main__.py")):
        return shlex.join(["hfx", *argv[1:]])
    return shlex.join(["python", *argv])
