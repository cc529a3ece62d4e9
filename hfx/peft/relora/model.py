"""The ReLoRA tuner: peft's ``LoraModel`` with ReLoRA layers, exact persistence and export to plain LoRA."""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from peft import LoraConfig, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from hfx.peft.relora.config import ReLoraConfig
from hfx.peft.relora.layer import ReLoraLinear, named_relora_layers

# ReLoRA wraps "every linear of attention and MLP". peft's "all-linear" resolves exactly that generically for
# any architecture (every nn.Linear / Conv1D except the output head), so no per-model table is needed.
DEFAULT_TARGET_MODULES = "all-linear"


def active_adapter_name(model) -> str | None:
    """The active adapter of a ``PeftModel`` (a string) or of a tuner (peft keeps a list there)."""
    name = getattr(model, "active_adapter", None)
    if isinstance(name, (list, tuple)):
        if len(name) != 1:
            raise ValueError(f"expected one active adapter, got {list(name)}")
        name = name[0]
    return name


class ReLoraModel(LoraModel):
    """Creates a ReLoRA model from a pretrained transformers model (through ``peft.get_peft_model``).

    It behaves like a LoRA model (same layers, same ``lora_`` parameter names, ``merge_and_unload``, ...) and
    adds what ReLoRA needs: each wrapped linear is a :class:`ReLoraLinear` that can merge its update into the
    base weight and restart (see :func:`hfx.peft.relora_restart`), and that records the merged updates so a
    saved adapter rebuilds the trained model from the original base.

    What the adapter is: everything training added to the base weights ``W_0``, i.e. the merged history of
    every restart plus the current low-rank update. The history lives in the base weights (that is how ReLoRA
    trains at LoRA's speed and memory), and peft's calls mean what they mean for LoRA:

    - ``merge_and_unload()`` returns the base model class with the trained weights ``W_0 + history + s B A``.
    - ``unload()`` returns the base model class with ``W_0``: the history is subtracted from the base weights
      (equal to the original up to float rounding; an adapter merged with ``merge_adapter()`` is unmerged).
    - ``with disable_adapter():`` the model computes the base model ``W_0``; no weight is changed on entering
      or leaving (the layers subtract the history's low-rank output, at the cost of one rank-``k*r`` product).
    - ``delete_adapter(name)`` removes the adapter and its history from the base weights.
    - ``PeftModel.from_pretrained(base, dir)`` replays the saved history onto ``base``'s weights in place (bit
      for bit the trained weights), so the loaded model computes exactly what the trained one did; ``unload()``
      gives ``base`` back.

    One ReLoRA adapter per model: its history lives in the shared base weights, so adapters could not be
    switched. For switchable adapters, ``export_as_lora`` gives an ordinary LoRA adapter.
    """

    prefix: str = "lora_"

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None and not peft_config.target_parameters:
            peft_config.target_modules = DEFAULT_TARGET_MODULES
        return peft_config

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        others = [name for name, other in self.peft_config.items() if other is not config]
        if others:
            raise ValueError(
                f"a model holds one ReLoRA adapter (it already has {others!r}): ReLoRA merges into the base weights, "
                "so its adapters cannot be switched. Use export_as_lora() to get switchable LoRA adapters."
            )

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear):
            if lora_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out=True but the target is torch.nn.Linear: setting it to False", stacklevel=2)
                lora_config.fan_in_fan_out = False
            return ReLoraLinear(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, Conv1D):
            if not lora_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out=False but the target is Conv1D: setting it to True", stacklevel=2)
                lora_config.fan_in_fan_out = True
            return ReLoraLinear(target, adapter_name, is_target_conv_1d_layer=True, config=lora_config, **kwargs)
        raise ValueError(
            f"ReLoRA wraps linear layers (torch.nn.Linear, transformers Conv1D), not {type(base).__name__}; "
            "remove it from target_modules"
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Loading a saved ReLoRA adapter: besides peft's key remapping, replay the saved merge history onto
        the base weights (replacing the history the layer held before, if any), so that the loaded model
        computes what the trained model computed. The history tensors are then copied into the layers'
        buffers by the ``load_state_dict`` that follows. Every history is checked before any weight changes.

        Raises:
            ValueError: a history that does not fit its layer (shape, rank, NaN / infinite values), only one of
                a layer's two history tensors, or ``low_cpu_mem_usage=True``.
        """
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        plan = []
        for name, module in model.named_modules():
            if not isinstance(module, ReLoraLinear) or adapter_name not in module.relora_history_A:
                continue
            keys = (f"{name}.relora_history_A.{adapter_name}", f"{name}.relora_history_B.{adapter_name}")
            new_A, new_B = (state_dict.get(key) for key in keys)
            if (new_A is None) != (new_B is None):
                missing = keys[0] if new_A is None else keys[1]
                raise ValueError(f"cannot load ReLoRA adapter {adapter_name!r} into {name!r}: the saved adapter lacks "
                                 f"{missing!r} (it has the other history tensor)")
            if module.relora_history_A[adapter_name].device.type == "meta":
                raise ValueError("loading a ReLoRA adapter with low_cpu_mem_usage=True is not supported")
            if new_A is None:  # saved without a history (no restart): what the layer held before goes
                new_A = module.relora_history_A[adapter_name].new_zeros(0, module.in_features)
                new_B = module.relora_history_B[adapter_name].new_zeros(module.out_features, 0)
                state_dict[keys[0]], state_dict[keys[1]] = new_A, new_B
            try:
                module.check_history(adapter_name, new_A, new_B)
            except ValueError as err:
                raise ValueError(f"cannot load ReLoRA adapter {adapter_name!r} into {name!r}: {err}") from None
            plan.append((module, new_A, new_B))
        for module, new_A, new_B in plan:
            module.remove_history(adapter_name)
            if new_A.numel():
                module.add_history_to_base(adapter_name, new_A, new_B, sign=+1)
        return state_dict

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        """peft's unload, plus: the history of every adapter that is not merged leaves the base weights (all of
        them for ``unload()``), so ``unload()`` gives ``W_0`` back and ``merge_and_unload()`` the trained model."""
        merged_names = set(self.active_adapters if adapter_names is None else adapter_names) if merge else set()
        layers = [m for m in self.model.modules() if isinstance(m, ReLoraLinear)]
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        # The detached layers still hold the very base layers that are now in the model.
        for layer in layers:
            if not merge and layer.merged:
                layer.unmerge()
            for name in list(layer.relora_history_A):
                if name not in merged_names:
                    layer.remove_history(name)
        return model

    def relora_layers(self, adapter_name: str | None = None) -> list[tuple[str, ReLoraLinear]]:
        """``(name, layer)`` of every ReLoRA layer holding ``adapter_name`` (default: the active one)."""
        return named_relora_layers(self.model, adapter_name or active_adapter_name(self))

    @torch.no_grad()
    def export_as_lora(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> LoraConfig:
        """Write the trained model's whole update (merged history and current adapter) as ONE ordinary peft
        LoRA adapter that any peft user loads onto the original base, without hfx.

        The history is exactly a low-rank factorisation: ``sum_i s B_i A_i + s B A = [B_1 ... B_k B] [A_1; ...;
        A_k; A] * s``, so layer by layer the export has rank ``(k + 1) * r`` (``k`` restarts) with the scale
        folded into B (``lora_alpha = r``, scaling 1). Parameters of ``modules_to_save`` are exported as they are.

        Args:
            save_directory: folder that receives ``adapter_config.json`` and ``adapter_model.safetensors``.
            adapter_name: the ReLoRA adapter to export (default: the active one).

        Returns:
            The ``LoraConfig`` written.

        Raises:
            ValueError: no ReLoRA adapter of that name, or the adapter is currently merged.
        """
        adapter_name = adapter_name or active_adapter_name(self)
        config = self.peft_config.get(adapter_name)
        if not isinstance(config, ReLoraConfig):
            raise ValueError(f"export_as_lora: the model has no ReLoRA adapter {adapter_name!r} (it has "
                             f"{sorted(self.peft_config)})")
        layers = self.relora_layers(adapter_name)
        if any(adapter_name in layer.merged_adapters for _, layer in layers):
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before export_as_lora()")

        # Start from peft's own adapter state dict (modules_to_save, keys in the saved format), then replace
        # each ReLoRA layer's entries by the concatenated factors.
        state_dict = get_peft_model_state_dict(self.model, adapter_name=adapter_name)
        state_dict = {k: v for k, v in state_dict.items() if ".relora_history_" not in k}
        ranks = {}
        for name, layer in layers:
            scaling = layer.scaling[adapter_name]
            lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            hist_A, hist_B = layer.relora_history_A[adapter_name], layer.relora_history_B[adapter_name]
            full_A = torch.cat([hist_A.to(lora_A.dtype), lora_A], dim=0)
            full_B = torch.cat([hist_B.to(lora_B.dtype), lora_B], dim=1) * scaling
            state_dict[f"{name}.lora_A.weight"] = full_A.contiguous()
            state_dict[f"{name}.lora_B.weight"] = full_B.contiguous()
            ranks[name] = full_A.shape[0]
        state_dict = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state_dict.items()}

        rank = max(ranks.values())
        lora_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        values = {k: v for k, v in dataclasses.asdict(config).items() if k in lora_fields}
        values.update(
            r=rank,
            lora_alpha=rank,
            use_rslora=False,
            rank_pattern={name: r for name, r in ranks.items() if r != rank},
            alpha_pattern={name: r for name, r in ranks.items() if r != rank},
            target_modules=sorted(name for name, _ in layers),
            inference_mode=True,
        )
        values.pop("peft_type", None)
        lora_config = LoraConfig(**values)

        os.makedirs(save_directory, exist_ok=True)
        weights_path = os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME)
        save_file(state_dict, weights_path + ".tmp", metadata={"format": "pt"})
        os.replace(weights_path + ".tmp", weights_path)
        lora_config.save_pretrained(str(save_directory))
        return lora_config

