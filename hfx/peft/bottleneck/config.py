"""Configuration of bottleneck adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from hfx.peft._registration import HfxPeftType

NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclass
class BottleneckAdapterConfig(PeftConfig):
    """Adds, after each targeted sublayer, a bottleneck adapter applied to that sublayer's output ``h``:
    ``h + up(non_linearity(down(h)))``, where ``down`` projects to ``bottleneck_size`` features and ``up``
    back. Houlsby et al. place one after the attention output projection and one after the feed-forward
    output, before the residual additions; the default targets do exactly that for the model types in
    ``DEFAULT_TARGET_MODULES`` (``o_proj`` and ``down_proj`` for Llama-like models).

    Both projections start near zero (normal with std ``init_std``, zero biases), so the adapted model starts
    near the identity of the pretrained one. Adapters are nonlinear, hence cannot be merged into the base
    weights: ``merge_and_unload()`` refuses, ``unload()`` returns the base model.

    Args:
        target_modules: names (or a regex) of the sublayers followed by an adapter; linear layers
            (``torch.nn.Linear``, transformers ``Conv1D``). Default: per model type, see above.
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
        super().__post_init__()
        self.peft_type = HfxPeftType.BOTTLENECK_ADAPTER
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.bottleneck_size <= 0:
            raise ValueError(f"BottleneckAdapterConfig.bottleneck_size={self.bottleneck_size} must be > 0")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"BottleneckAdapterConfig.non_linearity={self.non_linearity!r} must be one of {NON_LINEARITIES}"
            )
        if self.init_std < 0:
            raise ValueError(f"BottleneckAdapterConfig.init_std={self.init_std} must be >= 0")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"BottleneckAdapterConfig.adapter_dropout={self.adapter_dropout} must lie in [0, 1)")
