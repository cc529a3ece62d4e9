"""Engine integrations of methods whose core lives elsewhere (hfx.peft): one module each, listed once in
:data:`PEFT_INTEGRATIONS` by peft method name. A module provides ``validate(config, peft_config)``,
``prepare(run, model, num_processes)`` and ``callbacks(run, optimizer_name)``, and registers its schedules."""

from hfx.trainers.integrations import relora

PEFT_INTEGRATIONS = {"relora": relora}

__all__ = ["PEFT_INTEGRATIONS"]
