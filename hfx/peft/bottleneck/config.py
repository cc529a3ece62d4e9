"""Configuration of bottleneck adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from hfx.peft._registration import HfxPeftConfigMixin, HfxPeftType
from hfx.peft._validation import check_choice, check_int, check_module_names, check_real

NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclass
class BottleneckAdapterConfig(HfxPeftConfigMixin, PeftConfig):
    """Adds, after each targeted sublayer, a bottleneck adapter applied to that sublayer's output ``h``:
    ``h + up(non_linearity(down(h)))``, where ``down`` projects to ``bottleneck_size`` features and ``up``
    back. Houlsby et al. place one after the attention output projection and one after the feed-forward
    output, before the residual additions; the default targets do exactly that, in every layer, for the model
    types in ``hfx.peft.bottleneck.model.DEFAULT_TARGET_MODULES`` (``o_proj`` and ``down_proj`` for Llama-like
    models, ``attention.output.dense`` and the layer's ``output.dense`` for BERT and RoBERTa, ``attention.o_proj``
    and ``mlp.fc2`` for ViT, ...). Other model types need ``target_modules``.

    Both projections start near zero (normal with std ``init_std``, zero biases), so the adapted model starts
    near the identity of the pretrained one. Adapters are nonlinear, hence cannot be merged into the base
    weights: ``merge_and_unload()`` refuses, ``unload()`` returns the base model.

    Args:
        target_modules: names (or a regex) of the sublayers followed by an adapter; linear layers
            (``torch.nn.Linear``, transformers ``Conv1D``). A string is a regex matched against the whole module
            name; a list holds names or name suffixes (as in peft). Default: per model type, see above.
        bottleneck_size: width of the bottleneck (the paper uses 8 to 256).
        non_linearity: one of ``relu``, ``gelu``, ``silu``, ``tanh``.
        init_std: standard deviation of the initial projection weights (the paper: 1e-2).
        adapter_dropout: dropout on the bottleneck activations.
        modules_to_save: other modules trained and saved with the adapter (e.g. a classifier head).
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Sublayers followed by an adapter (names or a regex)."}
    )
    bottleneck_size: int = field(default=64, metadata={"help": "Width of the adapter bottleneck."})
    non_linearity: str = field(default="gelu", metadata={"help": f"One of {NON_LINEARITIES}."})
    init_std: float = field(default=1e-2, metadata={"help": "Std of the initial projection weights."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the bottleneck activations."})
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules not to adapt (names or a regex)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Other modules trained and saved with the adapter."}
    )

    def __post_init__(self):
        where = "BottleneckAdapterConfig."
        self.bottleneck_size = check_int(where + "bottleneck_size", self.bottleneck_size, minimum=1)
        self.non_linearity = check_choice(where + "non_linearity", self.non_linearity, NON_LINEARITIES)
        self.init_std = check_real(where + "init_std", self.init_std, low=0.0)
        self.adapter_dropout = check_real(where + "adapter_dropout", self.adapter_dropout, low=0.0, high=1.0,
                                          high_open=True)
        check_module_names(where + "target_modules", self.target_modules)
        check_module_names(where + "exclude_modules", self.exclude_modules)
        check_module_names(where + "modules_to_save", self.modules_to_save, allow_regex=False)
        super().__post_init__()
        self.peft_type = HfxPeftType.BOTTLENECK_ADAPTER
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
