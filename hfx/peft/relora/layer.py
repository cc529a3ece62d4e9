"""The ReLoRA layer: a peft LoRA ``Linear`` that also records the low-rank updates already merged into its base.

After ``k`` restarts the base weight of a layer holds ``W_0 + s * sum_i B_i A_i``. The factors of that sum
are kept, stacked, in ``relora_history_A`` (shape ``(k*r, in_features)``) and ``relora_history_B``
(shape ``(out_features, k*r)``), so that ``B_hist @ A_hist = sum_i B_i A_i`` (unscaled, like ``lora_B @ lora_A``).
They are never used in the forward pass (the base weight already contains them); they are what a saved
adapter needs to rebuild the trained model from the original base, and what ``export_as_lora`` concatenates.
"""

from __future__ import annotations

import math

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import layer as lora_layer
from peft.utils.other import transpose


class _HistoryDict(BufferDict):
    """Persistent per-adapter buffers whose number of rows grows with each restart.

    ``load_state_dict`` into a model with fewer (or no) restarts behind it resizes the buffers to the
    incoming shapes instead of failing with a size mismatch; this is what makes resuming a run and loading
    a saved adapter onto a freshly wrapped model work.
    """

    def __init__(self):
        super().__init__(persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        for name, buffer in list(self._buffers.items()):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != buffer.shape:
                self._buffers[name] = buffer.new_empty(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        # Accelerate's save_state keeps one of several tensors that share a storage, and every empty tensor
        # shares "no storage": a checkpoint written before the first restart lacks all but one of the empty
        # histories. An empty history that is not in the state dict stays empty, which is what was saved.
        for name, buffer in self._buffers.items():
            if buffer.numel() == 0 and prefix + name not in state_dict and prefix + name in missing_keys:
                missing_keys.remove(prefix + name)


class ReLoraLinear(lora_layer.Linear):
    """``peft.tuners.lora.Linear`` plus the merged-update history (see the module docstring)."""

    adapter_layer_names = lora_layer.Linear.adapter_layer_names + ("relora_history_A", "relora_history_B")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        if "relora_history_A" not in self._modules:
            self.relora_history_A = _HistoryDict()
            self.relora_history_B = _HistoryDict()
        # Empty histories are created before the LoRA factors so that peft's move to the base layer's
        # device and dtype (at the end of update_layer) covers them too.
        self.relora_history_A[adapter_name] = torch.zeros(0, self.in_features)
        self.relora_history_B[adapter_name] = torch.zeros(self.out_features, 0)
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    def num_restarts(self, adapter_name: str) -> int:
        """How many restarts (merged blocks of rank ``r``) the history of ``adapter_name`` holds."""
        return self.relora_history_A[adapter_name].shape[0] // self.r[adapter_name]

    @torch.no_grad()
    def add_history_to_base(self, adapter_name: str, hist_A: torch.Tensor, hist_B: torch.Tensor, sign: int = 1) -> None:
        """``W += sign * s * B_hist @ A_hist`` in place, block by block (rank ``r`` each) in the order of the
        restarts and with the operations of ``get_delta_weight``, so that replaying a history onto the
        original base weight gives bit for bit the trained base weight (same device and dtype).

        Args:
            hist_A: ``(k*r, in_features)`` stacked A factors.
            hist_B: ``(out_features, k*r)`` stacked B factors.
            sign: +1 adds the history, -1 removes it (up to rounding).
        """
        weight = self.get_base_layer().weight
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        if hist_A.shape[0] % r or hist_A.shape[0] != hist_B.shape[1]:
            raise ValueError(
                f"ReLoRA history of shapes {tuple(hist_A.shape)} / {tuple(hist_B.shape)} is not a stack of rank-{r} blocks"
            )
        hist_A, hist_B = hist_A.to(weight.device), hist_B.to(weight.device)
        cast_to_fp32 = weight.device.type == "cpu" and hist_A.dtype in (torch.float16, torch.bfloat16)
        for start in range(0, hist_A.shape[0], r):
            block_A = hist_A[start : start + r].contiguous()
            block_B = hist_B[:, start : start + r].contiguous()
            if cast_to_fp32:
                block_A, block_B = block_A.float(), block_B.float()
            delta = (transpose(block_B @ block_A, self.fan_in_fan_out) * scaling).to(hist_A.dtype)
            if sign > 0:
                weight.data += delta.to(weight.dtype)
            else:
                weight.data -= delta.to(weight.dtype)

    @torch.no_grad()
    def merge_and_reinit(self, adapter_name: str, generator: torch.Generator | None = None) -> None:
        """One ReLoRA restart of this layer, in place: ``W += s * B @ A`` (the layer's own
        ``get_delta_weight``), append ``(A, B)`` to the history, then ``A ~ kaiming_uniform(a=sqrt(5))`` and
        ``B = 0``. The function computed by the layer is unchanged. Parameters keep their identity, so an
        optimizer, a GradScaler or DDP holding them stays valid.

        Args:
            adapter_name: the adapter to restart.
            generator: random source for A; pass one seeded identically on every rank under data parallelism.

        Raises:
            RuntimeError: the adapter is currently merged (``merge_adapter()``): restarting would merge it twice.
        """
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"cannot restart ReLoRA adapter {adapter_name!r} while it is merged; unmerge it first")
        base_weight = self.get_base_layer().weight
        base_weight.data += self.get_delta_weight(adapter_name).to(base_weight.dtype)

        lora_A, lora_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        hist_A, hist_B = self.relora_history_A[adapter_name], self.relora_history_B[adapter_name]
        self.relora_history_A[adapter_name] = torch.cat([hist_A, lora_A.to(hist_A.dtype)], dim=0)
        self.relora_history_B[adapter_name] = torch.cat([hist_B, lora_B.to(hist_B.dtype)], dim=1)

        # A != 0 and B = 0: the function is unchanged and B gets a gradient at once (the reference code sets
        # both to zero, which leaves every LoRA gradient at zero until the next merge).
        torch.nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        lora_B.zero_()


def named_relora_layers(module: torch.nn.Module, adapter_name: str) -> list[tuple[str, ReLoraLinear]]:
    """``(name, layer)`` of every ReLoRA layer inside ``module`` that holds ``adapter_name``, in module order."""
    return [
        (name, m) for name, m in module.named_modules() if isinstance(m, ReLoraLinear) and adapter_name in m.lora_A
    ]
