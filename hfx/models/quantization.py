"""Post-training dynamic int8 quantization of a transformers model's linear layers, saved as safetensors.

Dynamic quantization (``torch.ao.quantization.quantize_dynamic``) stores each ``nn.Linear`` weight as int8 with
a per-tensor scale and zero point, and quantizes the activations on the fly at each call; on an x86 CPU (fbgemm)
an encoder's forward runs about twice as fast (bench/RESULTS.md). Chosen over torchao's int8 configs because
here (torch 2.14, CPU, no ``torch.compile``) those gave no speed-up; torch marks its quantized tensors
deprecated, so this module pins what it relies on to four calls and fails loudly if they go.

torch saves such models only by pickling (``torch.save``). Here the int8 weights, scales and zero points are
plain tensors in ``model.safetensors`` (``<module>.weight_int8`` / ``.weight_scale`` / ``.weight_zero_point``),
beside the model's ``config.json`` and ``quantization.json`` (which modules are int8), and
:func:`load_quantized` rebuilds the model from its config. Limits: CPU inference only (no CUDA kernels, no
training), per-tensor affine int8 (what ``quantize_dynamic`` makes by default), ``nn.Linear`` layers only (the
embeddings and LayerNorms stay float32).

    q = quantize_dynamic_int8(model)             # a quantized copy; model is untouched
    save_quantized(q, "int8/"); tokenizer.save_pretrained("int8/")
    q = load_quantized("int8/", AutoModelForSequenceClassification)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

FORMAT = "hfx dynamic int8 (torch.ao quantize_dynamic, per-tensor affine qint8 linear weights)"


def _quantized_linear_class():
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def quantize_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` (in eval mode) whose ``nn.Linear`` layers are dynamically quantized to int8."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch's deprecation notices of quantized tensors, once per layer
        warnings.simplefilter("ignore", (UserWarning, DeprecationWarning, FutureWarning))
        return quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear}, dtype=torch.qint8)


def save_quantized(model: torch.nn.Module, folder: str | Path) -> None:
    """Write a model made by :func:`quantize_dynamic_int8` to ``folder``: ``config.json`` (its transformers config),
    ``model.safetensors`` (int8 weights, their scales and zero points, every other tensor as it is) and
    ``quantization.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    linear = _quantized_linear_class()
    tensors, quantized = {}, []
    for name, module in model.named_modules():
        if isinstance(module, linear):
            weight, bias = module._packed_params._weight_bias()
            if weight.qscheme() != torch.per_tensor_affine:
                raise ValueError(f"{name}: only per-tensor affine int8 weights can be saved, got {weight.qscheme()}")
            tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
            tensors[f"{name}.weight_scale"] = torch.tensor(weight.q_scale(), dtype=torch.float64)
            tensors[f"{name}.weight_zero_point"] = torch.tensor(weight.q_zero_point(), dtype=torch.int64)
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().contiguous()
            quantized.append(name)
    skip = tuple(f"{name}." for name in quantized)
    for key, value in model.state_dict().items():
        if not key.startswith(skip) and torch.is_tensor(value):
            tensors[key] = value.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", "quantization": FORMAT})
    model.config.save_pretrained(folder)
    (folder / "quantization.json").write_text(json.dumps({"format": FORMAT, "torch": torch.__version__,
                                                          "modules": quantized}, indent=2))


def load_quantized(folder: str | Path, model_class) -> torch.nn.Module:
    """The model :func:`save_quantized` wrote: ``model_class`` (an Auto class or a model class) built from the
    folder's config, quantized like the saved one, holding the saved tensors exactly. CPU, eval mode.

    Raises:
        ValueError: ``folder`` holds no quantized model, or its tensors do not fit the architecture.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "quantization.json").is_file():
        raise ValueError(f"{folder} holds no quantized model (no quantization.json): save it with save_quantized")
    from transformers import AutoConfig

    spec = json.loads((folder / "quantization.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    build = model_class.from_config if hasattr(model_class, "from_config") else model_class
    model = quantize_dynamic_int8(build(config))
    tensors = load_file(str(folder / "model.safetensors"))
    modules = dict(model.named_modules())
    linear = _quantized_linear_class()
    for name in spec["modules"]:
        module = modules.get(name)
        if not isinstance(module, linear):
            raise ValueError(f"{folder}: {name!r} is not a quantized linear layer of {type(model).__name__}")
        weight = torch._make_per_tensor_quantized_tensor(tensors.pop(f"{name}.weight_int8"),
                                                         float(tensors.pop(f"{name}.weight_scale")),
                                                         int(tensors.pop(f"{name}.weight_zero_point")))
        module.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
    # The float tensors, by name (a quantized layer's own state_dict hooks would want its packed weights).
    persistent = set(model.state_dict())  # non-persistent buffers (position_ids) are rebuilt, not saved
    expected = {k: v for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
                if k in persistent}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder}: tensors do not fit {type(model).__name__} (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value)
    return model.eval()
