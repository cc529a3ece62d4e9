"""The ReLoRA layer: a peft LoRA ``Linear`` that also records the low-rank updates already merged into its base.

After ``k`` restarts the base weight of a layer holds ``W_0 + s * sum_i B_i A_i``. The factors of that sum
are kept, stacked, in ``relora_history_A`` (shape ``(k*r, in_features)``) and ``relora_history_B``
(shape ``(out_features, k*r)``), so that ``B_hist @ A_hist = sum_i B_i A_i`` (unscaled, like ``lora_B @ lora_A``).

The history is part of the adapter, as in peft's LoRA everything the adapter adds to ``W_0`` is: the forward
pass with the adapter on costs what a LoRA layer costs (the base weight already contains the history), and

- with adapters disabled (``disable_adapter()``, or a ``"__base__"`` row of a mixed batch) the layer computes
  ``W_0 x``: it subtracts ``s * B_hist @ (A_hist @ x)`` from the base layer's output, never touching a weight;
- ``remove_history`` (what ``unload()`` and ``delete_adapter()`` do) subtracts the history from the base weight,
  giving back ``W_0`` up to float rounding;
- a saved adapter carries the history, which loading replays onto the original base (``add_history_to_base``),
  and ``export_as_lora`` concatenates it into one ordinary LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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

    def check_history(self, adapter_name: str, hist_A: torch.Tensor, hist_B: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``(hist_A, hist_B)`` is a finite history of this layer: stacked rank-``r``
        blocks of shapes ``(k*r, in_features)`` and ``(out_features, k*r)``."""
        r = self.r[adapter_name]
        shapes = f"{tuple(hist_A.shape)} / {tuple(hist_B.shape)}"
        if hist_A.dim() != 2 or hist_B.dim() != 2 or hist_A.shape[1] != self.in_features \
                or hist_B.shape[0] != self.out_features or hist_A.shape[0] != hist_B.shape[1] or hist_A.shape[0] % r:
            raise ValueError(
                f"ReLoRA history of shapes {shapes} does not fit this layer: expected (k*{r}, {self.in_features}) / "
                f"({self.out_features}, k*{r}), stacked rank-{r} blocks"
            )
        if not (torch.isfinite(hist_A).all() and torch.isfinite(hist_B).all()):
            raise ValueError(f"ReLoRA history of shapes {shapes} holds NaN or infinite values")

    @torch.no_grad()
    def add_history_to_base(self, adapter_name: str, hist_A: torch.Tensor, hist_B: torch.Tensor, sign: int = 1) -> None:
        """``W += sign * s * B_hist @ A_hist`` in place, block by block (rank ``r`` each) with the operations of
        ``get_delta_weight``: adding goes in the order of the restarts, so that replaying a history onto the
        original base weight gives bit for bit the trained base weight (same device and dtype); removing goes
        in the reverse order (equal to the original up to float rounding).

        Args:
            hist_A: ``(k*r, in_features)`` stacked A factors.
            hist_B: ``(out_features, k*r)`` stacked B factors.
            sign: +1 adds the history, -1 removes it.

        Raises:
            ValueError: ``sign`` is not +1 or -1, or the history does not fit (see :meth:`check_history`);
                the weight is then untouched.
        """
        if sign not in (1, -1) or isinstance(sign, bool):
            raise ValueError(f"sign={sign!r} must be +1 (add the history) or -1 (remove it)")
        self.check_history(adapter_name, hist_A, hist_B)
        weight = self.get_base_layer().weight
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        hist_A, hist_B = hist_A.to(weight.device), hist_B.to(weight.device)
        cast_to_fp32 = weight.device.type == "cpu" and hist_A.dtype in (torch.float16, torch.bfloat16)
        starts = range(0, hist_A.shape[0], r)
        for start in starts if sign > 0 else reversed(starts):
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
    def remove_history(self, adapter_name: str) -> None:
        """Subtract the merged history of ``adapter_name`` from the base weight and empty it: the base layer
        holds ``W_0`` again (up to float rounding) and the adapter is its current low-rank update alone."""
        hist_A, hist_B = self.relora_history_A[adapter_name], self.relora_history_B[adapter_name]
        if hist_A.numel():
            self.add_history_to_base(adapter_name, hist_A, hist_B, sign=-1)
        self.relora_history_A[adapter_name] = hist_A.new_zeros(0, self.in_features)
        self.relora_history_B[adapter_name] = hist_B.new_zeros(self.out_features, 0)

    def history_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """``s * B_hist @ (A_hist @ x)`` for input ``x`` of shape ``(..., in_features)`` (``None`` without history):
        what the merged history adds to the base layer's output."""
        hist_A, hist_B = self.relora_history_A[adapter_name], self.relora_history_B[adapter_name]
        if hist_A.numel() == 0:
            return None
        low_rank = F.linear(F.linear(x.to(hist_A.dtype), hist_A), hist_B)
        return low_rank * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.get("adapter_names")
        result = super().forward(x, *args, **kwargs)
        if self.disable_adapters:
            without = {name: None for name in self.relora_history_A}  # every row computes the base model
        elif adapter_names is not None:  # rows of a mixed batch that do not use the adapter (e.g. "__base__")
            without = {name: torch.tensor([a != name for a in adapter_names], device=x.device)
                       for name in self.relora_history_A}
        else:
            return result
        for name, rows in without.items():
            delta = self.history_output(x, name)
            if delta is None:
                continue
            if rows is not None:
                delta = delta * rows.view(-1, *([1] * (delta.dim() - 1))).to(delta.dtype)
            result = result - delta.to(result.dtype)
        return result

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's ``delete_adapter`` plus: the adapter's merged history leaves the base weight with it."""
        if adapter_name in self.relora_history_A:
            self.remove_history(adapter_name)
        super().delete_adapter(adapter_name)

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
            RuntimeError: the adapter is currently merged (``merge_adapter()``): restarting would merge it twice;
                or its factors hold NaN or infinite values, which would corrupt the base weight for good. Nothing
                is changed then.
        """
        self.check_restart(adapter_name)
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

    def check_restart(self, adapter_name: str) -> None:
        """Raise ``RuntimeError`` if :meth:`merge_and_reinit` must not run now (see there); changes nothing."""
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"cannot restart ReLoRA adapter {adapter_name!r} while it is merged; unmerge it first")
        for factor in ("lora_A", "lora_B"):
            if not torch.isfinite(getattr(self, factor)[adapter_name].weight).all():
                raise RuntimeError(
                    f"{factor} of ReLoRA adapter {adapter_name!r} holds NaN or infinite values (training diverged): a "
                    "restart would merge them into the base weight for good"
                )


def named_relora_layers(module: torch.nn.Module, adapter_name: str) -> list[tuple[str, ReLoraLinear]]:
    """``(name, layer)`` of every ReLoRA layer inside ``module`` that holds ``adapter_name``, in module order."""
    return [
        (name, m) for name, m in module.named_modules() if isinstance(m, ReLoraLinear) and adapter_name in m.lora_A
    ]
