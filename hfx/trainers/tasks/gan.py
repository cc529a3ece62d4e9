"""``gan``: a generator against a discriminator, each with its own optimizer (DCGAN, WGAN(-GP), hinge + SN, cGAN,
StyleGAN-style).

Every batch the discriminator takes a step; the generator takes one every ``n_critic``-th batch (WGAN's
critic iterations), both through the engine's phases. ``global_step`` therefore counts discriminator steps.

- **discriminator phase**: fakes ``G(z, y)`` are drawn without a graph through G; the loss is the chosen
  ``d_loss(D(x, y), D(G(z), y))`` (:data:`hfx.losses.GAN_LOSSES`), plus ``gradient_penalty * GP`` (WGAN-GP,
  per-sample gradient norms at random interpolates) and ``r1_gamma / 2 * R1`` when set.
- **generator phase**: ``g_loss(D(G(z), y))`` with D frozen (the engine freezes the other optimizer's models).
- ``weight_clip``: the original WGAN clamps the critic's weights; here they are clamped before every use
  (each phase's forward), which is where the clamp matters.
- ``style_mixing_prob`` (StyleGAN-style generator): with that probability a batch's fakes take their layers
  from ``mixing_cutoff`` on from a second z (StyleGAN's mixing regularisation).

The labels of a conditional model are the batch's own (real and fake share them); the generator embeds them
and the projection discriminator projects them. ``ema:`` averages the generator only (``ema_models``); the
evaluation and the saved :class:`~hfx.pipelines.GANPipeline` use those weights (``ema.use_for_*``).

Evaluation, at fixed noise in every evaluation and run: the held-out losses and mean scores of D on the eval
split against as many fakes; a fixed-noise grid (one row per class for a conditional model) in ``samples/``;
and with ``evaluator`` (a digits classifier saved by the ``image-classification`` task) ``eval_num_samples``
samples scored in that classifier's features: FID and KID against the eval split, ``conditional_accuracy``
(the share classified as the class asked for) for a conditional model, and for every model the class
histogram of the predictions: ``class_kl_to_uniform`` (KL(p || uniform), 0 when every class is equally
frequent) and ``classes_covered`` (classes given at least 1 % of the samples): mode coverage.

All noise comes from the global RNG, which checkpoints restore; what the task counts between steps (images
each side was trained on) is its state, so a killed run resumes bit-exactly.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from hfx.losses import GAN_LOSSES, clip_weights_, gradient_penalty, r1_penalty
from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks._image_tasks import (
    ImageColumns,
    build_image_data,
    check_evaluator,
    image_grid,
    trained_classifier,
    write_sample_grids,
)
from hfx.trainers.tasks.base import Task, TaskData, register_task, with_weights

# The model arguments the data decides: a recipe may not set them.
FROM_DATA = {"generator": ("image_size", "out_channels", "num_classes"),
             "discriminator": ("image_size", "in_channels", "num_classes")}


def style_mixing_grid(generator, seed: int, cutoff: int | None = None, n: int = 6) -> tuple[torch.Tensor, int]:
    """StyleGAN's style-mixing figure for a StyleGAN-style generator, with constant noise: ``(images, rows)``,
    (n + 1) x (n + 1) images in [-1, 1]. The first row holds n sources B, the first column n sources A (the corner
    is blank); cell (i, j) takes the w of its layers before ``cutoff`` (default: half the layers, at least 1) from
    A_i and the rest from B_j. A conditional generator draws A_i and B_j of class i (mod the classes)."""
    config, device = generator.config, generator.device
    cutoff = cutoff or max(1, generator.num_ws // 2)
    g = torch.Generator().manual_seed(seed)
    z_a, z_b = torch.randn(n, config.latent_dim, generator=g), torch.randn(n, config.latent_dim, generator=g)
    z_a, z_b = z_a.to(device), z_b.to(device)
    labels = None if config.num_classes is None else torch.arange(n, device=device) % config.num_classes
    a = generator(z_a, labels, noise_mode="const").sample
    b = generator(z_b, labels, noise_mode="const").sample
    rows = [torch.cat([torch.full_like(a[:1], -1), b])]
    for i in range(n):
        row_labels = None if labels is None else labels[i:i + 1].expand(n)
        mixed = generator(z_a[i:i + 1].expand(n, -1), row_labels, mixing_latents=z_b, mixing_cutoff=cutoff,
                          noise_mode="const").sample
        rows.append(torch.cat([a[i:i + 1], mixed]))
    return torch.cat(rows).clamp(-1, 1), n + 1


@dataclass
class GANOptions(ImageColumns):
    architecture: Literal["dcgan", "stylegan"] = "dcgan"
    """The generator: ``dcgan`` (:class:`~hfx.models.gan.DCGANGenerator`) or ``stylegan``
    (:class:`~hfx.models.gan.StyleGANGenerator`). The discriminator is a DCGAN one either way."""
    generator: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the generator class (size, channels and classes come from the data)."""
    discriminator: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :class:`~hfx.models.gan.DCGANDiscriminator` (``norm``, ``spectral_norm``, ...)."""
    conditional: bool = False
    """A class-conditional GAN: a class embedding in G, a projection discriminator, labels from the data."""
    loss: str = "non_saturating"
    """One of :data:`hfx.losses.GAN_LOSSES`: ``minimax``, ``non_saturating``, ``lsgan``, ``hinge``, ``wgan``."""
    n_critic: int = bounded(1, ">=1")
    """Discriminator steps per generator step (WGAN-GP: 5)."""
    gradient_penalty: float = bounded(0.0, ">=0")
    """lambda of WGAN-GP's gradient penalty (the paper: 10); 0 for none."""
    r1_gamma: float = bounded(0.0, ">=0")
    """gamma of the R1 penalty on real images (the loss term is gamma / 2 * R1); 0 for none."""
    weight_clip: float | None = bounded(None, ">0", "null turns weight clipping off")
    """The original WGAN's clamp of the critic's weights (0.01 there)."""
    style_mixing_prob: float = bounded(0.0, "[0,1]")
    """StyleGAN-style generator only: the share of batches whose fakes mix two latents."""
    grid_size: int = bounded(8, ">=0")
    """Fixed-noise grids at every evaluation: grid_size x grid_size samples, or grid_size per class (0: none)."""
    evaluator: str | None = None
    """A classifier folder (``image-classification`` artifact): FID/KID in its features, class histogram and
    (conditional) accuracy of ``eval_num_samples`` samples at every evaluation."""
    eval_num_samples: int = bounded(1000, ">=1")

    def __post_init__(self):
        if self.loss not in GAN_LOSSES:
            close = difflib.get_close_matches(self.loss, list(GAN_LOSSES), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; choose from {', '.join(GAN_LOSSES)}"
            raise ConfigError(f"unknown task_options.loss {self.loss!r}{hint} (WGAN-GP is loss: wgan with "
                              "task_options.gradient_penalty: 10)")
        for model, keys in FROM_DATA.items():
            for key in keys:
                if key in getattr(self, model):
                    why = ("class labels need task_options.conditional: true (the number of classes comes from the "
                           "data)") if key == "num_classes" else "it comes from the data (task_options.image_size)"
                    raise ConfigError(f"task_options.{model}.{key} cannot be set: {why}")
        if self.style_mixing_prob > 0 and self.architecture != "stylegan":
            raise ConfigError(f"task_options.style_mixing_prob={self.style_mixing_prob} needs task_options.architecture: "
                              f"stylegan (a {self.architecture} generator has one latent per image)")
        norm = self.discriminator.get("norm", "batch")
        if (self.gradient_penalty > 0 or self.r1_gamma > 0) and norm == "batch":
            raise ConfigError("task_options.discriminator.norm is 'batch', which couples the samples a per-sample "
                              "gradient penalty is taken over: set task_options.discriminator.norm to 'layer' or 'none'")
        if self.eval_num_samples < 2 and self.evaluator:
            raise ConfigError("task_options.eval_num_samples must be >= 2 for FID and KID")


@register_task("gan")
class GANTask(Task):
    Options = GANOptions
    hub_task_type = "unconditional-image-generation"
    eval_seed = 40_000

    def build_data(self) -> TaskData:
        data, self.info = build_image_data(self)
        check_evaluator(self.options.evaluator)
        return data

    def build_models(self) -> dict[str, torch.nn.Module]:
        from hfx.models.gan import GENERATORS, DCGANDiscriminator

        opts, info = self.options, self.info
        num_classes = len(info.label_names) if opts.conditional else None
        self.loss_fns = GAN_LOSSES[opts.loss]
        built = {}
        for name, cls, kwargs in (
                ("generator", GENERATORS[opts.architecture], {**opts.generator, "out_channels": info.channels}),
                ("discriminator", DCGANDiscriminator, {**opts.discriminator, "in_channels": info.channels})):
            try:
                built[name] = cls(image_size=info.size, num_classes=num_classes, **kwargs)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"task_options.{name} does not make a {cls.__name__}: {err}") from None
        generator = built["generator"]
        self.latent_shape = generator.latent_shape
        self.num_ws = getattr(generator, "num_ws", None)
        self.images_seen = {"discriminator": 0, "generator": 0}
        return built

    # ------------------------------------------------------------------------------------------ the engine's API
    def optimizer_groups(self, models):
        return {"discriminator": ["discriminator"], "generator": ["generator"]}

    def phases(self, state) -> list[str]:
        """D on every batch; G too on every n_critic-th."""
        if (state.global_step + 1) % self.options.n_critic == 0:
            return ["discriminator", "generator"]
        return ["discriminator"]

    def ema_models(self, models) -> list[str]:
        return ["generator"]

    def state_dict(self) -> dict[str, Any]:
        return {"images_seen": dict(self.images_seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images_seen = dict(state["images_seen"])

    # ------------------------------------------------------------------------------------------ the losses
    def _labels(self, batch) -> torch.Tensor | None:
        return batch["labels"] if self.options.conditional else None

    def generate(self, generator, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Training fakes: G(z, y), with style mixing on a ``style_mixing_prob`` share of the batches."""
        p = self.options.style_mixing_prob
        if p > 0 and torch.rand(()) < p:
            cutoff = int(torch.randint(1, self.num_ws, ()))
            return generator(z, labels, mixing_latents=torch.randn_like(z), mixing_cutoff=cutoff).sample
        return generator(z, labels).sample

    def loss(self, models, batch, state):
        opts = self.options
        G, D = models["generator"], models["discriminator"]
        real, labels = batch["pixel_values"], self._labels(batch)
        z = torch.randn(real.shape[0], *self.latent_shape, device=real.device)
        self.images_seen[state.phase] += real.shape[0]
        if opts.weight_clip is not None:
            clip_weights_(D, opts.weight_clip)
        if state.phase == "generator":
            return self.loss_fns.g_loss(D(self.generate(G, z, labels), labels).scores)

        with torch.no_grad():
            fake = self.generate(G, z, labels)
        if opts.r1_gamma > 0:
            real = real.detach().requires_grad_(True)
        real_scores, fake_scores = D(real, labels).scores, D(fake, labels).scores
        loss = self.loss_fns.d_loss(real_scores, fake_scores)
        extra = {"d_real": real_scores.detach().mean(), "d_fake": fake_scores.detach().mean()}
        if opts.gradient_penalty > 0:
            penalty = gradient_penalty(lambda x: D(x, labels).scores, real, fake)
            loss = loss + opts.gradient_penalty * penalty
            extra["gradient_penalty"] = penalty.detach()
        if opts.r1_gamma > 0:
            penalty = r1_penalty(real_scores, real)
            loss = loss + opts.r1_gamma / 2 * penalty
            extra["r1"] = penalty.detach()
        return loss, extra

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        acc = self.accelerator
        G, D = acc.unwrap_model(models["generator"]), acc.unwrap_model(models["discriminator"])
        sums = torch.zeros(4, dtype=torch.float64)
        count, real_features = 0, []
        need_features = self.options.evaluator is not None and not hasattr(self, "_real_features")
        for index, batch in enumerate(loader):
            real, labels = batch["pixel_values"], self._labels(batch)
            generator = self.eval_generator(real.device, index)
            z = torch.randn(real.shape[0], *self.latent_shape, generator=generator, device=real.device)
            fake = G(z, labels, generator=generator).sample
            real_scores, fake_scores = D(real, labels).scores, D(fake, labels).scores
            n = real.shape[0]
            values = torch.stack([self.loss_fns.d_loss(real_scores, fake_scores), self.loss_fns.g_loss(fake_scores),
                                  real_scores.mean(), fake_scores.mean()]).double() * n
            values = acc.reduce(values, "sum")
            sums += values.cpu()
            count += int(acc.reduce(torch.tensor([n], device=real.device), "sum"))
            if need_features:
                real_features.append(acc.gather_for_metrics(self.evaluator().features_and_logits(real)[0]).cpu())
        metrics = dict(zip(("d_loss", "g_loss", "d_real", "d_fake"), (sums / max(count, 1)).tolist()))
        self._eval_count = count
        if need_features:
            self._real_features = torch.cat(real_features)
        if self.options.evaluator:  # every process draws the same samples, so all agree on the numbers
            metrics.update(self.sample_metrics(G))
        if self.options.grid_size > 0 and acc.is_main_process:
            grids = {"": self.sample_grid(G)}
            if self.options.architecture == "stylegan":
                grids["style-mixing-"] = image_grid(*style_mixing_grid(G, seed=self.eval_seed + 2))
            write_sample_grids(self, grids, state.global_step)
        return metrics

    def evaluator(self):
        """The classifier of ``task_options.evaluator`` (loaded on first use, on the models' device)."""
        return trained_classifier(self)

    def sample_metrics(self, G) -> dict[str, float]:
        """FID, KID, class histogram and (conditional) accuracy of ``eval_num_samples`` samples at fixed noise."""
        from hfx.metrics import frechet_distance, kernel_inception_distance

        n, num_classes = self.options.eval_num_samples, len(self.info.label_names)
        device = self.accelerator.device
        labels = torch.arange(n, device=device) % num_classes if self.options.conditional else None
        generator = torch.Generator(device).manual_seed(self.eval_seed - 1)
        features, logits = [], []
        for start in range(0, n, 500):
            chunk = None if labels is None else labels[start:start + 500]
            z = torch.randn(min(500, n - start), *self.latent_shape, generator=generator, device=device)
            f, lg = self.evaluator().features_and_logits(G(z, chunk, generator=generator).sample.clamp(-1, 1))
            features.append(f.cpu())
            logits.append(lg.cpu())
        features, predicted = torch.cat(features), torch.cat(logits).argmax(1)
        kid_size = min(1000, n, len(self._real_features))
        kid = kernel_inception_distance(features, self._real_features, subsets=50, subset_size=kid_size)
        share = torch.bincount(predicted, minlength=num_classes).double() / n
        metrics = {"fid": frechet_distance(features, self._real_features), "kid": kid.mean,
                   "class_kl_to_uniform": float(torch.where(share > 0, share * (share * num_classes).log(), 0.0).sum()),
                   "classes_covered": float((share >= 0.01).sum())}
        if labels is not None:
            metrics["conditional_accuracy"] = float((predicted == labels.cpu()).double().mean())
        return metrics

    def sample_grid(self, G):
        """The fixed-noise grid: ``grid_size`` per class in rows (conditional), or ``grid_size`` x ``grid_size``."""
        k, device = self.options.grid_size, self.accelerator.device
        generator = torch.Generator().manual_seed(self.eval_seed + 1)
        if self.options.conditional:
            classes = min(len(self.info.label_names), 10)
            labels, rows = torch.arange(classes, device=device).repeat_interleave(k), classes
        else:
            labels, rows = None, k
        z = torch.randn(rows * k, *self.latent_shape, generator=generator).to(device)
        return image_grid(G(z, labels, generator=generator).sample, rows)

    # ------------------------------------------------------------------------------------------ artifact
    def pipeline(self, generator, discriminator):
        from hfx.pipelines import GANPipeline

        return GANPipeline(generator=generator, discriminator=discriminator,
                           class_names=self.info.label_names if self.options.conditional else None)

    def save(self, models, state_dicts, output_dir: Path) -> None:
        self.pipeline(with_weights(models["generator"], state_dicts["generator"]),
                      with_weights(models["discriminator"], state_dicts["discriminator"])).save_pretrained(output_dir)

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        opts, info = self.options, self.info
        kind = {"dcgan": "DCGAN", "stylegan": "StyleGAN-style GAN"}[opts.architecture]
        d = opts.discriminator
        parts = [f"{opts.loss} loss"]
        if opts.gradient_penalty:
            parts.append(f"gradient penalty lambda {opts.gradient_penalty:g}")
        if opts.r1_gamma:
            parts.append(f"R1 gamma {opts.r1_gamma:g}")
        if opts.weight_clip:
            parts.append(f"weight clipping {opts.weight_clip:g}")
        if d.get("spectral_norm"):
            parts.append("spectral norm in D")
        if opts.n_critic > 1:
            parts.append(f"{opts.n_critic} critic steps per generator step")
        what = (f"A class-conditional {kind} (class embedding in G, projection discriminator)" if opts.conditional
                else f"An unconditional {kind}")
        summary = (f"{what} trained with the {', '.join(parts)} on {info.size}x{info.size} images"
                   f"{f' of {len(info.label_names)} classes' if opts.conditional else ''}; the saved GANPipeline "
                   f"samples with the generator's {'EMA ' if self.config.ema.enabled else ''}weights in one forward pass.")
        if opts.evaluator and "fid" in metrics:
            summary += (f" FID and KID are measured on {opts.eval_num_samples} samples against the eval split in the "
                        f"features of the classifier at `{opts.evaluator}` (not Inception's), so they compare only "
                        "with scores in those same features.")
        # Per metric, what it was measured on: the held-out images (and as many fakes), or the scored samples.
        sampled = {"fid", "kid", "class_kl_to_uniform", "classes_covered", "conditional_accuracy"}
        extractor = f"penultimate features of the classifier at {opts.evaluator}" if opts.evaluator else None
        results = [{"metric": name, "value": round(value, 6),
                    "num_samples": opts.eval_num_samples if name in sampled else getattr(self, "_eval_count", None),
                    "extractor": extractor if name in {"fid", "kid"} else None} for name, value in metrics.items()]
        return {"summary": summary, **({"eval_results": results} if results else {})}
