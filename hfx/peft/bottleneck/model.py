"""The bottleneck adapter tuner (a peft ``BaseTuner``)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner

from hfx.peft.bottleneck.layer import BottleneckAdapterLayer

# Houlsby et al.: one adapter after the attention output projection and one after the feed-forward output,
# both before the residual addition; these are those sublayers' names per transformers (5.x) model type. A
# list holds module-name suffixes (peft matches ``name == t or name.endswith("." + t)``); a string is a regex
# matched against the whole name. BERT-like models need one: no suffix without the layer index tells the
# feed-forward output ("layer.3.output.dense") from the attention output ("layer.3.attention.output.dense").
_LLAMA_LIKE = ["o_proj", "down_proj"]
_BERT_LIKE = r"(.*\.)?layer\.\d+\.(attention\.)?output\.dense"
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "phi3"], _LLAMA_LIKE),
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "gpt_neox": ["attention.dense", "mlp.dense_4h_to_h"],
    "opt": ["self_attn.out_proj", "fc2"],
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "vit": ["attention.o_proj", "mlp.fc2"],
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

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None and model_config.get("model_type") not in self.target_module_mapping:
            raise ValueError(
                f"BottleneckAdapterConfig.target_modules is unset and model type {model_config.get('model_type')!r} "
                f"has no default (defaults exist for {', '.join(sorted(self.target_module_mapping))}): set "
                "target_modules to the attention output and feed-forward output projections"
            )
        return super()._prepare_adapter_config(peft_config, model_config)

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
