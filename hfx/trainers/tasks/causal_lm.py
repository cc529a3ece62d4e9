"""``causal-lm``: next-token prediction with any ``AutoModelForCausalLM`` on text.

Model, by ``task_options.model``: a transformers model type (``llama``) built from
``AutoConfig.for_model(model_type, **model_options)`` with random weights, or a folder / Hub name with
``pretrained: true``. Tokenizer: ``task_options.tokenizer`` (folder or Hub name), else a byte-level BPE
trained with ``tokenizers`` on the train split (main process first, kept in ``output_dir/tokenizer`` so
every process and every resumed run uses the same one) and saved with the model as a
``PreTrainedTokenizerFast``. Texts are tokenized, joined with the end-of-text token and cut into blocks
of ``block_size`` tokens. Evaluation: mean token loss and perplexity on the eval split.

Transformer-XL memory (``model: hfx_lm`` with ``model_options.mem_len > 0``): the data become XL's
batchified streams (``stream``, on by default then). Each split's tokens are cut into as many parallel
streams as the global batch has rows, and batch k holds segment k of every stream, in order, so that each row
continues the text of the same row of the previous step; the model's memory of the previous segment is
carried from step to step (task state: a resumed run continues with the memory it had) and through the
evaluation, and is cleared at each epoch's start.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks.base import Task, TaskData, register_task

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"


@dataclass
class CausalLMOptions:
    model: str = "llama"
    """A transformers model type built from config, or (with ``pretrained``) a folder / Hub name."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """Config fields (``hidden_size``, ``num_hidden_layers``, ...) or ``from_pretrained`` keyword arguments."""
    pretrained: bool = False
    tokenizer: str | None = None
    """A tokenizer folder / Hub name; None trains a byte-level BPE on the train split."""
    vocab_size: int = bounded(4096, ">=1")
    """Size of the trained tokenizer's vocabulary."""
    text_column: str = "text"
    block_size: int = bounded(256, ">=1")
    """Tokens per training example; with Transformer-XL memory, the segment length."""
    stream: bool | None = None
    """XL's batchified streams (see the module docstring); None: on exactly when the model has ``mem_len > 0``."""


def train_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE (GPT-2 style: any byte sequence is encodable, no unknown token) trained on
    ``texts``, as a ``PreTrainedTokenizerFast`` whose bos/eos/pad token is ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=END_OF_TEXT)


@register_task("causal-lm")
class CausalLMTask(Task):
    Options = CausalLMOptions
    hub_task_type = "text-generation"
    peft_task_type = "CAUSAL_LM"

    def build_data(self) -> TaskData:
        opts, cfg = self.options, self.config.data
        dataset = self.load_dataset()
        if opts.text_column not in dataset[cfg.train_split].column_names:
            raise ConfigError(f"dataset {cfg.dataset!r} has no column {opts.text_column!r} (columns: "
                             f"{', '.join(dataset[cfg.train_split].column_names)}); set task_options.text_column")
        self.tokenizer = self._tokenizer(dataset[cfg.train_split])
        self.model_config = self._model_config()
        self.memory_on = getattr(self.model_config, "mem_len", 0) > 0
        self.stream = self.memory_on if opts.stream is None else opts.stream
        self._check_memory_options()
        processes = self.accelerator.num_processes
        train_rows = self.config.train.batch_size * processes
        eval_rows = (self.config.train.eval_batch_size or self.config.train.batch_size) * processes
        cut = (lambda split, rows: self._streams(dataset[split], rows)) if self.stream else \
            (lambda split, rows: self._blocks(dataset[split]))
        train = cut(cfg.train_split, train_rows)
        eval_split = cut(cfg.eval_split, eval_rows) if cfg.eval_split is not None else None
        unit = f"{train_rows} streams of block_size" if self.stream else "block_size"
        if len(train) == 0:
            raise ConfigError(f"the train split holds fewer than {unit}={opts.block_size} tokens")
        if eval_split is not None and len(eval_split) == 0:
            raise ConfigError(f"the eval split holds fewer than {unit}={opts.block_size} tokens")
        return TaskData(train=train, eval=eval_split, shuffle=not self.stream)

    def _check_memory_options(self) -> None:
        opts, config = self.options, self.model_config
        if self.memory_on and not self.stream:
            raise ConfigError(f"model_options.mem_len={config.mem_len} carries memory between consecutive segments: "
                              "it needs task_options.stream: true (or left unset)")
        if self.memory_on and config.segment_length != opts.block_size:
            raise ConfigError(f"model_options.segment_len={config.segment_length} must equal task_options.block_size="
                              f"{opts.block_size}: each training batch is one segment of every stream")
        if getattr(config, "position", None) == "learned" and opts.block_size > config.max_position_embeddings:
            raise ConfigError(f"position 'learned' has max_position_embeddings={config.max_position_embeddings} rows, "
                              f"fewer than task_options.block_size={opts.block_size}")
        method = str((self.config.peft or {}).get("method", "")).lower()
        if self.memory_on and method in ("prefix_tuning", "prompt_tuning", "p_tuning"):
            raise ConfigError(f"peft.method {method!r} puts virtual tokens into the cache or the input, which "
                              f"Transformer-XL memory (model_options.mem_len={config.mem_len}) cannot hold")

    def _tokenizer(self, train):
        from transformers import AutoTokenizer

        opts = self.options
        if opts.tokenizer is not None:
            return AutoTokenizer.from_pretrained(opts.tokenizer)
        saved = self.output_dir / "tokenizer"
        with self.accelerator.main_process_first():
            if not (saved / "tokenizer.json").is_file() and self.accelerator.is_main_process:
                logger.info("training a byte-level BPE tokenizer (vocab %d) on %d texts", opts.vocab_size, len(train))
                tokenizer = train_bpe_tokenizer(iter(train[opts.text_column]), opts.vocab_size)
                tokenizer.save_pretrained(saved)
        return AutoTokenizer.from_pretrained(saved)

    def _blocks(self, split):
        """Tokenize, join documents with end-of-text and cut into ``block_size`` token blocks (the
        remainder at the very end is dropped)."""
        size, eos = self.options.block_size, self.tokenizer.eos_token_id

        def to_blocks(batch):
            ids = []
            for row in self.tokenizer(batch[self.options.text_column])["input_ids"]:
                ids.extend(row)
                ids.append(eos)
            usable = len(ids) // size * size
            return {"input_ids": [ids[i:i + size] for i in range(0, usable, size)]}

        blocks = split.map(to_blocks, batched=True, batch_size=1000, remove_columns=split.column_names)
        return blocks.with_format("torch")

    def _streams(self, split, rows: int):
        """XL's batchified streams: the split's tokens (documents joined by end-of-text) cut into ``rows``
        equal streams; item ``k * rows + r`` is segment k of stream r, so batch k of a loader that reads in
        order (each process its contiguous share of the rows) continues every row of batch k - 1."""
        size, eos = self.options.block_size, self.tokenizer.eos_token_id
        ids = []
        for texts in split.iter(batch_size=1000):
            for row in self.tokenizer(texts[self.options.text_column])["input_ids"]:
                ids.extend(row)
                ids.append(eos)
        segments = len(ids) // (rows * size)
        streams = torch.tensor(ids[:segments * rows * size]).view(rows, segments, size)
        return StreamBlocks(streams.transpose(0, 1).reshape(-1, size))

    def _pretrained(self) -> bool:
        return self.options.pretrained or Path(self.options.model).is_dir()

    def _model_config(self):
        """The model's config: the pretrained one, or ``model``'s type built from ``model_options`` (with the
        tokenizer's size and special tokens, ``max_position_embeddings`` and, for memory, ``segment_len``
        defaulting to ``block_size``)."""
        import transformers
        from huggingface_hub.errors import StrictDataclassError

        opts, tok = self.options, self.tokenizer
        if self._pretrained():  # model_options that are config fields change the config (mem_len: 0, ...)
            config = transformers.AutoConfig.from_pretrained(opts.model)
            fields = {k: v for k, v in opts.model_options.items() if hasattr(config, k) and k not in _LOADING}
            try:
                return transformers.AutoConfig.from_pretrained(opts.model, **fields) if fields else config
            except StrictDataclassError as err:
                raise ConfigError(f"task_options.model_options: {_reason(err)}") from None
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        options = {"max_position_embeddings": opts.block_size, **special, **opts.model_options}
        if opts.model_options.get("mem_len"):
            options.setdefault("segment_len", opts.block_size)
        try:
            return transformers.AutoConfig.for_model(opts.model, vocab_size=len(tok), **options)
        except StrictDataclassError as err:  # hfx's configs: the last line names the field and what is allowed
            raise ConfigError(f"task_options.model_options: {_reason(err)}") from None
        except (TypeError, ValueError) as err:
            if opts.model not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
                raise ConfigError(f"task_options.model {opts.model!r} is not a transformers model type "
                                  f"(nor a folder; registered types include llama, mixtral, gpt2, hfx_lm)") from None
            raise ConfigError(f"task_options.model_options for {opts.model!r}: {str(err).splitlines()[0]}") from None

    def build_models(self) -> dict[str, torch.nn.Module]:
        import transformers

        opts, tok = self.options, self.tokenizer
        if self._pretrained():
            loading = {k: v for k, v in opts.model_options.items()
                       if not hasattr(self.model_config, k) or k in _LOADING}
            model = transformers.AutoModelForCausalLM.from_pretrained(opts.model, config=self.model_config, **loading)
            if model.get_input_embeddings().num_embeddings < len(tok):
                model.resize_token_embeddings(len(tok))
            return {"model": model}
        return {"model": transformers.AutoModelForCausalLM.from_config(self.model_config)}

    # ---------------------------------------------------------------------------------- memory (XL)
    memory = None  # the XLMemoryCache carried from step to step
    memory_epoch = -1

    def loss(self, models, batch, state):
        ids = batch["input_ids"]
        if not self.memory_on:
            return models["model"](input_ids=ids, labels=ids).loss
        if state.epoch != self.memory_epoch:  # streams restart at each epoch: so does the memory
            self.memory, self.memory_epoch = None, state.epoch
        out = models["model"](input_ids=ids, labels=ids, past_key_values=self.memory, use_cache=True)
        self.memory = out.past_key_values
        return out.loss

    def state_dict(self):
        if not self.memory_on:
            return None
        return {"memory": None if self.memory is None else self.memory.state_dict(), "epoch": self.memory_epoch}

    def load_state_dict(self, state) -> None:
        if not self.memory_on or state is None:
            return
        from hfx.models.lm import XLMemoryCache

        self.memory_epoch = state["epoch"]
        memory = state["memory"]  # loaded onto the CPU: back to where the model is
        self.memory = None if memory is None else XLMemoryCache.from_state_dict(memory).to(self.accelerator.device)

    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        nll, tokens = 0.0, 0
        memory = None  # with memory, the eval streams are read in order, each segment seeing the previous ones
        for batch in loader:
            ids = batch["input_ids"]
            kwargs = {"past_key_values": memory, "use_cache": True} if self.memory_on else {}
            out = models["model"](input_ids=ids, **kwargs)
            memory = out.past_key_values if self.memory_on else None
            # prompt tuning (peft) puts its virtual tokens' logits first: score only the real positions
            logits = out.logits[:, -ids.shape[1]:].float()
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                       reduction="none").view(ids.shape[0], -1).sum(-1)
            losses = self.accelerator.gather_for_metrics(losses)
            nll += float(losses.sum())
            tokens += losses.numel() * (ids.shape[1] - 1)
        mean = nll / max(tokens, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}

    def save(self, models, state_dicts, output_dir: Path) -> None:
        models["model"].save_pretrained(output_dir, state_dict=state_dicts["model"])
        self.save_preprocessing(output_dir)

    def save_preprocessing(self, output_dir: Path) -> None:
        self.tokenizer.save_pretrained(output_dir)

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        trained = "a byte-level BPE trained on the same data" if self.options.tokenizer is None else self.options.tokenizer
        config, described = self.model_config, ""
        if getattr(config, "model_type", None) == "hfx_lm":
            parts = [f"position `{config.position}`", f"{config.norm_position}-{config.norm}", f"MLP `{config.mlp}`",
                     f"{config.num_attention_heads} query / {config.num_key_value_heads} key-value heads"]
            if config.num_experts:
                parts.append(f"{config.num_experts} experts, top-{config.num_experts_per_tok}")
            if config.mem_len:
                parts.append(f"Transformer-XL memory of {config.mem_len} tokens, trained on batchified streams")
            described = " (" + ", ".join(parts) + ")"
        return {"summary": f"A `{self.options.model}` causal language model{described} trained on "
                           f"`{self.config.data.dataset}` with {self.options.block_size}-token blocks; tokenizer: {trained}."}


#: ``from_pretrained`` arguments that are also config attributes but say how to load, not what to build.
_LOADING = ("dtype", "torch_dtype", "attn_implementation", "device_map", "revision", "trust_remote_code")


def _reason(err: Exception) -> str:
    """The last line of a strict config's validation error (it names the field and what is allowed)."""
    reason = str(err).strip().splitlines()[-1].strip()
    return reason.split(": ", 1)[1] if reason.split(": ", 1)[0] in ("ValueError", "TypeError") else reason


class StreamBlocks(torch.utils.data.Dataset):
    """Rows of token ids as ``{"input_ids": row}`` items (what the block datasets give), in a fixed order."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index]}
