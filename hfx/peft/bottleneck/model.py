"""The bottleneck adapter tuner (a peft ``BaseTuner``)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner

from hfx.peft.bottleneck.layer import BottleneckAdapterLayer

# Houlsby et al.: one adapter after the attention output projection and one after the feed-forward output,
# both before the residual addition; these are those sublayers' names per transformers model type.
_LLAMA_LIKE = ["o_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "phi3"], _LLAMA_LIKE),
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "gpt_neox": ["attention.dense", "mlp.dense_4h_to_h"],
    "opt": ["self_attn.out_proj", "fc2"],
    "bert": ["attention.output.dense", r"layer.\d+.output.dense"],
    "roberta": ["attention.output.dense", r"layer.\d+.output.dense"],
    "vit": ["attention.output.dense", r"layer.\d+.output.dense"],
}


class BottleneckAdapterModel(BaseTuner):
    """Adds bottleneck adapters (:class:`BottleneckAdapterConfig`) to a model, through ``peft.get_peft_model``.

    Several adapters can live on one model and be switched with ``set_adapter``; ``disable_adapter()`` and
    ``unload()`` give back the base model's function; saving and loading go through peft's usual
    ``save_pretrained`` / ``PeftModel.from_pretrained``.
    """

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckAdapterLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, BottleneckAdapterLayer):
            target.update_layer(adapter_name, config)
            return
        new_module = BottleneckAdapterLayer(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        raise ValueError(
            "bottleneck adapters are nonlinear and cannot be merged into the base weights: use unload() to get "
            "the base model back, or keep the PeftModel for inference"
        )
