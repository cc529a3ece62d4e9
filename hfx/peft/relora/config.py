"""Configuration of ReLoRA (Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates", ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig

from hfx.peft._registration import HfxPeftType

PRUNE_METHODS = ("reset", "random", "magnitude")


@dataclass
class ReLoraConfig(LoraConfig):
    """A :class:`peft.LoraConfig` whose low-rank update is merged into the base weights every
    ``relora_steps`` optimizer steps and then restarted from a fresh adapter, so that the sum of the
    successive low-rank updates reaches a high rank.

    All LoRA fields apply (``r``, ``lora_alpha``, ``lora_dropout``, ``modules_to_save``, ...). When
    ``target_modules`` is left unset, every linear layer of the model except its output head is wrapped
    (peft's ``"all-linear"``): for a Llama that is ``q/k/v/o_proj`` and ``gate/up/down_proj`` of every block.
    DoRA, ``lora_bias`` and initialisations other than the default are refused: a restart re-initialises
    A with kaiming-uniform and B with zeros, which is the default LoRA initialisation.

    Tuning (measured in ``bench/relora_pretraining.py``, see ``bench/RESULTS.md``):
    - A restart leaves a fresh adapter (B = 0, A at its kaiming scale), which moves the weights far less per
      step than the one it replaced. Give ReLoRA, like LoRA, a higher peak learning rate than full-rank
      training: 4x was best on a small Llama. At the full-rank LR, the restarts cost more than they gave.
    - Keep cycles long enough for the fresh adapter to regrow. There, 500 and 1,000 steps helped; 250 did not.
    - Most of the gap to full-rank training is closed by ``full_rank_warmup_steps``, once the full-rank
      model leads at the switch. There, a warm start of half the run closed more than half of LoRA's gap.

    Args:
        relora_steps: optimizer steps between two restarts (merge, re-initialise, prune optimizer state).
        restart_warmup_steps: after each restart the learning rate ramps linearly from 0 back to the
            cosine envelope over this many steps.
        warmup_steps: linear warm-up of the jagged schedule at the start of training.
        min_lr_ratio: the cosine envelope ends at ``min_lr_ratio`` times the peak learning rate.
        prune_method: how the optimizer state of the LoRA parameters is pruned at a restart:
            ``"reset"`` zeroes all of it, ``"random"`` a random ``prune_ratio`` of the entries,
            ``"magnitude"`` the ``prune_ratio`` of the entries with the smallest second moment. One mask
            per parameter is applied to every moment, so no entry keeps a first moment without a second.
        prune_ratio: fraction of the entries zeroed by ``"random"`` and ``"magnitude"`` (``"reset"``
            always zeroes everything).
        full_rank_warmup_steps: train the base model full-rank for this many steps before switching to
            ReLoRA (the paper's "warm start"); restarts then happen at
            ``full_rank_warmup_steps + k * relora_steps``. 0 disables it.
        restart_seed: seeds the re-initialisation of A and random pruning; with the step number it gives
            the same values on every data-parallel rank without any communication.
    """

    relora_steps: int = field(default=1000, metadata={"help": "Optimizer steps between two ReLoRA restarts."})
    restart_warmup_steps: int = field(default=100, metadata={"help": "LR ramp length after each restart."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up at the start of training."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final LR of the cosine envelope / peak LR."})
    prune_method: Literal["reset", "random", "magnitude"] = field(
        default="magnitude", metadata={"help": "Optimizer-state pruning at a restart: reset, random or magnitude."}
    )
    prune_ratio: float = field(default=0.9, metadata={"help": "Fraction of LoRA optimizer state zeroed."})
    full_rank_warmup_steps: int = field(default=0, metadata={"help": "Full-rank steps before ReLoRA starts."})
    restart_seed: int = field(default=0, metadata={"help": "Seed of A's re-initialisation and random pruning."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = HfxPeftType.RELORA
        checks = (
            ("relora_steps", self.relora_steps > 0, "must be > 0"),
            ("restart_warmup_steps", 0 <= self.restart_warmup_steps < self.relora_steps,
             f"must be >= 0 and < relora_steps ({self.relora_steps})"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "must lie in [0, 1]"),
            ("prune_method", self.prune_method in PRUNE_METHODS, f"must be one of {PRUNE_METHODS}"),
            ("prune_ratio", 0.0 < self.prune_ratio <= 1.0, "must lie in (0, 1]"),
            ("full_rank_warmup_steps", self.full_rank_warmup_steps >= 0, "must be >= 0"),
            ("use_dora", not self.use_dora, "is not supported by ReLoRA"),
            ("lora_bias", not self.lora_bias, "is not supported by ReLoRA"),
            ("init_lora_weights", self.init_lora_weights is True,
             "must be True: restarts re-initialise A kaiming-uniform and B = 0"),
            ("target_parameters", not self.target_parameters, "is not supported by ReLoRA"),
        )
        for name, ok, requirement in checks:
            if not ok:
                raise ValueError(f"ReLoraConfig.{name}={getattr(self, name)!r} {requirement}")
