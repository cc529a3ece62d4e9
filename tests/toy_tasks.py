"""Tasks and a model family written the way a new method would be: each in one place, registered with one
line, used by tests/test_task_api.py (also in subprocesses, which import this module)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import PreTrainedConfig, PreTrainedModel

from hfx._registry import register_auto_model
from hfx.trainers import Task, TaskData, bounded, register_task, with_weights


# ---------------------------------------------------------------------------------------------- a stateful task
@dataclass
class ToyQueueOptions:
    queue_size: int = bounded(48, ">=1")
    sleep: float = bounded(0.0, ">=0")
    """Seconds per step, so that a test can kill the run in the middle."""
    eval_sleep: float = bounded(0.0, ">=0")
    """Seconds each evaluation takes; it touches ``output_dir/evaluating-<step>`` when it starts."""


@register_task("test-toy-queue")
class ToyQueueTask(Task):
    """A MoCo-like toy: each loss compares the batch's embeddings with a FIFO queue of earlier ones (detached),
    then pushes the batch in. The queue is the task's state: without it a resumed run would diverge."""

    Options = ToyQueueOptions
    needs_dataset = False

    def build_data(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(512, 6, generator=g)
        data = torch.utils.data.TensorDataset(x, x @ torch.randn(6, 4, generator=g))
        return TaskData(train=data, eval=torch.utils.data.Subset(data, range(64)))

    def build_models(self):
        self.queue = torch.zeros(0, 4)
        self.pushed = 0
        return {"model": torch.nn.Linear(6, 4)}

    def loss(self, models, batch, state):
        x, y = batch
        if self.options.sleep:
            time.sleep(self.options.sleep)
        z = models["model"](x + 0.1 * torch.randn_like(x))  # noise from the global RNG, as augmentation would
        loss = F.mse_loss(z, y)
        if len(self.queue):
            loss = loss + 0.05 * (F.normalize(z, dim=1) @ F.normalize(self.queue, dim=1).T).pow(2).mean()
        self.queue = torch.cat([z.detach(), self.queue])[: self.options.queue_size]
        self.pushed += len(z)
        return loss, {"queue_norm": self.queue.norm()}

    @torch.no_grad()
    def evaluate(self, models, loader, state):
        if self.accelerator.is_main_process:
            (self.output_dir / f"evaluating-{state.global_step}").touch()
        time.sleep(self.options.eval_sleep)
        errors = [F.mse_loss(models["model"](x), y, reduction="sum") for x, y in loader]
        return {"mse": float(sum(errors)) / 64}

    def state_dict(self):
        return {"queue": self.queue, "pushed": self.pushed}

    def load_state_dict(self, state):
        self.queue, self.pushed = state["queue"], state["pushed"]

    def save(self, models, state_dicts, output_dir):
        save_file({**state_dicts["model"], "queue": self.queue.contiguous(),
                   "pushed": torch.tensor(self.pushed)}, output_dir / "model.safetensors")


# ---------------------------------------------------------------------------------------------- a family
class ToyFamilyConfig(PreTrainedConfig):
    model_type = "hfx_test_toy_family"
    width: int = 4


class ToyFamilyModel(PreTrainedModel):
    """A model family that says its own card facts: how to use it once, and a sample picture."""

    config_class = ToyFamilyConfig
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, x):
        return self.proj(x)

    @classmethod
    def hub_card_usage(cls, folder) -> str:
        return "y = model(torch.randn(2, 4))  # the toy family's own usage line"

    @classmethod
    def hub_card_samples(cls, folder, seed: int = 0):
        return torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8), 2


register_auto_model(ToyFamilyConfig, {"AutoModel": ToyFamilyModel})  # the family's one registration line


@register_task("test-toy-family")
class ToyFamilyTask(Task):
    """Trains the toy family; says only its summary and Hub task type."""

    needs_dataset = False
    hub_task_type = "feature-extraction"

    def build_data(self):
        x = torch.randn(128, 4, generator=torch.Generator().manual_seed(0))
        return TaskData(train=torch.utils.data.TensorDataset(x))

    def build_models(self):
        return {"model": ToyFamilyModel(ToyFamilyConfig(width=4))}

    def loss(self, models, batch, state):
        return (models["model"](batch[0]) - batch[0].flip(1)).pow(2).mean()

    def save(self, models, state_dicts, output_dir):
        with_weights(models["model"], state_dicts["model"]).save_pretrained(output_dir)

    def card_facts(self, metrics):
        return {"summary": "A toy family that learns to reverse four numbers."}
