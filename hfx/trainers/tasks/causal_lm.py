"""``causal-lm``: next-token prediction with any ``AutoModelForCausalLM`` on text.

Model, by ``task_options.model``: a transformers model type (``llama``) built from
``AutoConfig.for_model(model_type, **model_options)`` with random weights, or a folder / Hub name with
``pretrained: true``. Tokenizer: ``task_options.tokenizer`` (folder or Hub name), else a byte-level BPE
trained with ``tokenizers`` on the train split (main process first, kept in ``output_dir/tokenizer`` so
every process and every resumed run uses the same one) and saved with the model as a
``PreTrainedTokenizerFast``. Texts are tokenized, joined with the end-of-text token and cut into blocks
of ``block_size`` tokens. Evaluation: mean token loss and perplexity on the eval split.
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
        train = self._blocks(dataset[cfg.train_split])
        eval_split = self._blocks(dataset[cfg.eval_split]) if cfg.eval_split is not None else None
        if len(train) == 0:
            raise ConfigError(f"the train split holds fewer than task_options.block_size={opts.block_size} tokens")
        if eval_split is not None and len(eval_split) == 0:
            raise ConfigError(f"the eval split holds fewer than block_size={opts.block_size} tokens")
        return TaskData(train=train, eval=eval_split)

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

    def build_models(self) -> dict[str, torch.nn.Module]:
        import transformers

        opts, tok = self.options, self.tokenizer
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        if opts.pretrained or Path(opts.model).is_dir():
            model = transformers.AutoModelForCausalLM.from_pretrained(opts.model, **opts.model_options)
            if model.get_input_embeddings().num_embeddings < len(tok):
                model.resize_token_embeddings(len(tok))
            return {"model": model}
        options = {"max_position_embeddings": opts.block_size, **special, **opts.model_options}
        try:
            config = transformers.AutoConfig.for_model(opts.model, vocab_size=len(tok), **options)
        except ValueError as err:
            raise ConfigError(f"task_options.model {opts.model!r} is not a transformers model type "
                             f"({str(err).splitlines()[0]})") from None
        return {"model": transformers.AutoModelForCausalLM.from_config(config)}

    def loss(self, models, batch, state):
        return models["model"](input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        nll, tokens = 0.0, 0
        for batch in loader:
            ids = batch["input_ids"]
            # prompt tuning (peft) puts its virtual tokens' logits first: score only the real positions
            logits = models["model"](input_ids=ids).logits[:, -ids.shape[1]:].float()
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                       reduction="none").view(ids.shape[0], -1).sum(-1)
            losses = self.accelerator.gather_for_metrics(losses)
            nll += float(losses.sum())
            tokens += losses.numel() * (ids.shape[1] - 1)
        mean = nll / max(tokens, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}

    def save(self, models, state_dicts, output_dir: Path) -> None:
        models["model"].save_pretrained(output_dir, state_dict=state_dicts["model"])
        self.tokenizer.save_pretrained(output_dir)

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        trained = "a byte-level BPE trained on the same data" if self.options.tokenizer is None else self.options.tokenizer
        return {"summary": f"A `{self.options.model}` causal language model trained on `{self.config.data.dataset}` with "
                           f"{self.options.block_size}-token blocks; tokenizer: {trained}."}
