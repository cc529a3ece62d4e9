"""Configuration of ReLoRA (Lialin et al., "ReLoRA: High-Rank Training Through Low-Rank Updates", ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig

from hfx.peft._registration import HfxPeftConfigMixin, HfxPeftType
from hfx.peft._validation import check_choice, check_int, check_real

PRUNE_METHODS = ("reset", "random", "magnitude")


@dataclass
class ReLoraConfig(HfxPeftConfigMixin, LoraConfig):
    """A :class:`peft.LoraConfig` whose low-rank update is merged into the base weights every
    ``relora_steps`` optimizer steps and then restarted from a fresh adapter, so that the sum of the
    successive low-rank updates reaches a high rank.

    All LoRA fields apply (``r``, ``lora_alpha``, ``lora_dropout``, ``modules_to_save``, ...). When
    ``target_modules`` is left unset, every linear layer of the model except its output head is wrapped
    (peft's ``"all-linear"``): for a Llama that is ``q/k/v/o_proj`` and ``gate/up/down_proj`` of every block.
    DoRA, ``lora_bias`` and initialisations other than the default are refused: a restart re-initialises
    A with kaiming-uniform and B with zeros, which is the default LoRA initialisation. Every numeric field,
    LoRA's ``r``, ``lora_alpha``, ``lora_dropout``, ``rank_pattern`` and ``alpha_pattern`` included, is checked
    for its type and range (NaN and infinities refused): a restart merges ``scaling * B @ A`` into the base
    weights for good.

    ``save_pretrained`` writes ``"peft_type": "RELORA (a PEFT method of the hfx package: install hfx, then
    import hfx before loading)"``: a process without hfx shows that text in peft's ``KeyError``. Configs saved
    with ``"peft_type": "RELORA"`` (hfx 0.1) load as well.

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
        self._check_numbers()
        super().__post_init__()
        self.peft_type = HfxPeftType.RELORA
        checks = (
            ("use_dora", not self.use_dora, "is not supported by ReLoRA"),
            ("lora_bias", not self.lora_bias, "is not supported by ReLoRA"),
            ("init_lora_weights", self.init_lora_weights is True,
             "must be True: restarts re-initialise A kaiming-uniform and B = 0"),
            ("target_parameters", not self.target_parameters, "is not supported by ReLoRA"),
        )
        for name, ok, requirement in checks:
            if not ok:
                raise ValueError(f"ReLoraConfig.{name}={getattr(self, name)!r} {requirement}")

    def _check_numbers(self) -> None:
        """Types and ranges of the numeric fields, before anything uses them. A restart merges ``scaling * B @ A``
        into the base weights for good, so a NaN or infinite scale would corrupt the base: refused here."""
        where = "ReLoraConfig."
        self.relora_steps = check_int(where + "relora_steps", self.relora_steps, minimum=1)
        self.restart_warmup_steps = check_int(where + "restart_warmup_steps", self.restart_warmup_steps)
        if not 0 <= self.restart_warmup_steps < self.relora_steps:
            raise ValueError(f"ReLoraConfig.restart_warmup_steps={self.restart_warmup_steps!r} must be >= 0 and < "
                             f"relora_steps ({self.relora_steps})")
        self.warmup_steps = check_int(where + "warmup_steps", self.warmup_steps, minimum=0)
        self.full_rank_warmup_steps = check_int(where + "full_rank_warmup_steps", self.full_rank_warmup_steps, minimum=0)
        self.restart_seed = check_int(where + "restart_seed", self.restart_seed)
        self.min_lr_ratio = check_real(where + "min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        self.prune_method = check_choice(where + "prune_method", self.prune_method, PRUNE_METHODS)
        self.prune_ratio = check_real(where + "prune_ratio", self.prune_ratio, low=0.0, high=1.0, low_open=True)
        # LoRA's own fields, which peft's LoraConfig takes unchecked
        self.r = check_int(where + "r", self.r, minimum=1)
        check_real(where + "lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        self.lora_dropout = check_real(where + "lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        for field_name, check in (("rank_pattern", lambda w, v: check_int(w, v, minimum=1)),
                                  ("alpha_pattern", lambda w, v: check_real(w, v, low=0.0, low_open=True))):
            pattern = getattr(self, field_name)
            if pattern is None:
                continue
            if not isinstance(pattern, dict):
                raise TypeError(f"ReLoraConfig.{field_name}={pattern!r} must be a dict of module name -> value")
            for key, value in pattern.items():
                check(f"ReLoraConfig.{field_name}[{key!r}]", value)
