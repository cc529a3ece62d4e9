"""``python -m hfx ...`` is the ``hfx`` command; ``accelerate launch -m hfx train ...`` runs through here."""

from hfx.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
