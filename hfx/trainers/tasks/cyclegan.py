"""``cyclegan``: unpaired image-to-image translation between two domains (Zhu et al. 2017), with the defaults
of pytorch-CycleGAN-and-pix2pix.

Two generators, ``generator_ab`` (A -> B) and ``generator_ba`` (B -> A), and two PatchGAN discriminators,
``discriminator_a`` (real A vs translated B -> A) and ``discriminator_b``; one optimizer for both generators,
one for both discriminators, each taking a step on every batch (generators first, as in the reference).

- **generator phase**: ``fake_b = G_ab(a)``, ``fake_a = G_ba(b)``; the adversarial loss of each (LSGAN by
  default) against the frozen discriminators, plus ``cycle_weight`` (10) times the cycle losses
  ``|G_ba(fake_b) - a|_1 + |G_ab(fake_a) - b|_1``, plus ``identity_weight * cycle_weight`` (0.5 x 10) times the
  identity losses ``|G_ab(b) - b|_1 + |G_ba(a) - a|_1``.
- **discriminator phase**: each discriminator's loss on its domain's real images against the fakes of this
  step's generator phase, drawn through an image pool (``pool_size``, 50: Shrivastava et al.'s history of
  generated images; once full, each fake is swapped with probability 1/2 for a random older one).

The two pools (per process) are task state, with the images each side has seen, so a killed run resumes
bit-exactly; the pools' draws come from the global RNG, which checkpoints restore. The reference's learning
rate (constant, then linearly to 0) is ``scheduler: {name: warmup_stable_decay, options: {num_decay_steps: N,
decay_type: linear}}``, with Adam 2e-4 and betas (0.5, 0.999).

Data: one dataset whose ``domain_column`` says which domain each image is in (the first of ``domains`` is A).
Training pairs each image of A with an image of B by a fixed permutation (the pairing carries no meaning:
no loss compares the two), ``max(len(A), len(B))`` pairs per epoch, as the reference's unaligned loader.

Evaluation, on the eval split's images of each domain translated to the other: the cycle reconstruction L1
(on the [-1, 1] scale of the loss) and identity L1; with ``evaluator`` (a classifier of ``label_column``
saved by the ``image-classification`` task) the share of translated images still classified as their
source's class (``class_preserved_*``), the classifier's accuracy on the real images for comparison, and FID
of the translations against the real images of the target domain in that classifier's features; with
``domain_measure`` (a name in :data:`hfx.metrics.DOMAIN_MEASURES`) the share of translations whose measure
lies on the target domain's side of the midpoint between the two real domains' medians (``in_target_*``),
and the same share for the real images. A grid of the first ``grid_size`` eval images of each domain, their
translations and reconstructions goes to ``samples/``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hfx.losses import GAN_LOSSES, cycle_consistency_loss, identity_loss
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

#: The model arguments the data decides: a recipe may not set them.
FROM_DATA = {"generator": ("in_channels", "out_channels", "sample_size"), "discriminator": ("in_channels", "sample_size")}
#: Adversarial losses a CycleGAN may use (WGAN needs a Lipschitz constraint these discriminators do not have).
CYCLEGAN_LOSSES = ("lsgan", "non_saturating", "hinge")


@dataclass
class CycleGANOptions(ImageColumns):
    domain_column: str = "domain"
    """The column that says which domain an image is in (a ``ClassLabel`` or integer column)."""
    domains: list[str] | None = None
    """The two domains, A first, as names of the ``domain_column`` ``ClassLabel`` (or its integer values as
    strings); None: the column's two class names in order."""
    generator: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :class:`~hfx.models.gan.CycleGANGenerator` (``base_channels``, ``num_blocks``, ...)."""
    discriminator: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :class:`~hfx.models.gan.PatchGANDiscriminator` (``base_channels``, ``num_layers``, ...)."""
    loss: str = "lsgan"
    """The adversarial loss: ``lsgan`` (the reference), ``non_saturating`` or ``hinge``."""
    cycle_weight: float = bounded(10.0, ">=0")
    """lambda of the cycle losses (the reference's ``lambda_A`` = ``lambda_B`` = 10)."""
    identity_weight: float = bounded(0.5, ">=0")
    """The identity losses' weight as a fraction of ``cycle_weight`` (the reference's ``lambda_identity``, 0.5)."""
    pool_size: int = bounded(50, ">=0")
    """Fakes the discriminators see are drawn from a history of this many per direction; 0: this step's only."""
    grid_size: int = bounded(8, ">=0")
    """Eval images of each domain shown (with translation and reconstruction) at every evaluation; 0: none."""
    evaluator: str | None = None
    """A classifier folder (``image-classification`` artifact, trained on both domains): class preservation
    and FID of the translations in its features."""
    domain_measure: str | None = None
    """A per-image measure that tells the domains apart (:data:`hfx.metrics.DOMAIN_MEASURES`: ``stroke_width``)."""

    def __post_init__(self):
        if self.loss in GAN_LOSSES and self.loss not in CYCLEGAN_LOSSES:
            raise ConfigError(f"task_options.loss {self.loss!r} is not for cyclegan: its critic needs a Lipschitz "
                              f"constraint that this task does not apply (choose from {', '.join(CYCLEGAN_LOSSES)})")
        if self.loss not in CYCLEGAN_LOSSES:
            close = difflib.get_close_matches(self.loss, CYCLEGAN_LOSSES, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown task_options.loss {self.loss!r} for cyclegan{hint} (choose from "
                              f"{', '.join(CYCLEGAN_LOSSES)})")
        for model, keys in FROM_DATA.items():
            for key in keys:
                if key in getattr(self, model):
                    raise ConfigError(f"task_options.{model}.{key} cannot be set: it comes from the data "
                                      "(task_options.image_size and the images' channels)")
        if self.domains is not None and (not isinstance(self.domains, list) or len(self.domains) != 2
                                         or len(set(map(str, self.domains))) != 2):
            raise ConfigError(f"task_options.domains must be two different domain names (A first), got {self.domains!r}")
        if self.domain_measure is not None:
            from hfx.metrics import DOMAIN_MEASURES

            if self.domain_measure not in DOMAIN_MEASURES:
                raise ConfigError(f"unknown task_options.domain_measure {self.domain_measure!r}; choose from "
                                  f"{', '.join(DOMAIN_MEASURES)} or null")


class ImagePool:
    """The reference's ``ImagePool``: a history of up to ``size`` generated images. :meth:`query` returns, per
    image, the image itself while the pool fills, then with probability 1/2 a random stored image (which the
    new one replaces) and otherwise the new image. Draws come from the global torch RNG."""

    def __init__(self, size: int):
        self.size = size
        self.images: torch.Tensor | None = None  # (n, C, H, W) on the CPU, n <= size

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            stored = 0 if self.images is None else len(self.images)
            if stored < self.size:
                self.images = image[None].cpu() if self.images is None else torch.cat([self.images, image[None].cpu()])
                out.append(image)
            elif float(torch.rand(())) > 0.5:
                index = int(torch.randint(0, self.size, ()))
                out.append(self.images[index].clone().to(image.device))  # a copy: the slot is overwritten next
                self.images[index] = image.cpu()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "images": None if self.images is None else self.images.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size:
            raise ConfigError(f"the checkpoint's image pools hold {state['size']} images, task_options.pool_size is "
                              f"{self.size}: resume with the pool size it was trained with")
        self.images = state["images"]


class UnpairedImages(torch.utils.data.Dataset):
    """``max(len(A), len(B))`` items ``{pixel_values_a, labels_a, pixel_values_b, labels_b}``: image ``i % len(A)``
    of A with image ``perm[i] % len(B)`` of B (``perm`` a fixed permutation from ``seed``)."""

    def __init__(self, dataset, a_indices: list[int], b_indices: list[int], seed: int):
        self.dataset, self.a, self.b = dataset, a_indices, b_indices
        self.perm = np.random.default_rng(seed).permutation(max(len(a_indices), len(b_indices)))

    def __len__(self) -> int:
        return len(self.perm)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a = self.dataset[self.a[i % len(self.a)]]
        b = self.dataset[self.b[int(self.perm[i]) % len(self.b)]]
        return {"pixel_values_a": a["pixel_values"], "labels_a": a["labels"],
                "pixel_values_b": b["pixel_values"], "labels_b": b["labels"]}


@register_task("cyclegan")
class CycleGANTask(Task):
    Options = CycleGANOptions
    hub_task_type = "image-to-image"
    eval_seed = 50_000

    # ------------------------------------------------------------------------------------------ data, models
    def build_data(self) -> TaskData:
        opts = self.options
        data, self.info = build_image_data(self, extra_columns={opts.domain_column: "domain_column"})
        raw = data.train.with_format(None)
        feature = raw.features[opts.domain_column]
        values = [str(v) for v in (feature.names if hasattr(feature, "names") else sorted(set(raw[opts.domain_column])))]
        domains = [str(d) for d in opts.domains] if opts.domains is not None else values
        if opts.domains is None and len(values) != 2:
            raise ConfigError(f"the domain_column {opts.domain_column!r} has {len(values)} values ({', '.join(values)}); "
                              "name the two domains with task_options.domains: [A, B]")
        unknown = [d for d in domains if d not in values]
        if unknown:
            raise ConfigError(f"task_options.domains names {unknown} not in the column {opts.domain_column!r} "
                              f"(its values: {', '.join(values)})")
        self.domain_names = domains
        self.domain_ids = [values.index(d) if hasattr(feature, "names") else int(d) for d in domains]
        column = raw[opts.domain_column]
        a = [i for i, d in enumerate(column) if d == self.domain_ids[0]]
        b = [i for i, d in enumerate(column) if d == self.domain_ids[1]]
        for name, indices in zip(domains, (a, b)):
            if not indices:
                raise ConfigError(f"the train split has no image of domain {name!r} (column {opts.domain_column!r})")
        check_evaluator(opts.evaluator)
        self.train_sizes = (len(a), len(b))
        return TaskData(train=UnpairedImages(data.train, a, b, self.config.seed), eval=data.eval)

    def build_models(self) -> dict[str, torch.nn.Module]:
        from hfx.models.gan import CycleGANGenerator, PatchGANDiscriminator

        opts, info = self.options, self.info
        shape = {"in_channels": info.channels, "sample_size": info.size}
        specs = {"generator_ab": (CycleGANGenerator, "generator", {**shape, "out_channels": info.channels}),
                 "generator_ba": (CycleGANGenerator, "generator", {**shape, "out_channels": info.channels}),
                 "discriminator_a": (PatchGANDiscriminator, "discriminator", shape),
                 "discriminator_b": (PatchGANDiscriminator, "discriminator", shape)}
        built = {}
        for name, (cls, option, fixed) in specs.items():
            try:
                built[name] = cls(**getattr(opts, option), **fixed)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"task_options.{option} does not make a {cls.__name__}: {err}") from None
        self.loss_fns = GAN_LOSSES[opts.loss]
        self.pools = {"a": ImagePool(opts.pool_size), "b": ImagePool(opts.pool_size)}
        self.images_seen = {"generator": 0, "discriminator": 0}
        self._fakes = None
        return built

    # ------------------------------------------------------------------------------------------ the engine's API
    def optimizer_groups(self, models):
        return {"generator": ["generator_ab", "generator_ba"], "discriminator": ["discriminator_a", "discriminator_b"]}

    def phases(self, state) -> list[str]:
        return ["generator", "discriminator"]

    def ema_models(self, models) -> list[str]:
        return ["generator_ab", "generator_ba"]

    def state_dict(self) -> dict[str, Any]:
        return {"pools": {k: pool.state_dict() for k, pool in self.pools.items()}, "images_seen": dict(self.images_seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, pool in self.pools.items():
            pool.load_state_dict(state["pools"][key])
        self.images_seen = dict(state["images_seen"])

    # ------------------------------------------------------------------------------------------ the losses
    def loss(self, models, batch, state):
        opts = self.options
        a, b = batch["pixel_values_a"], batch["pixel_values_b"]
        self.images_seen[state.phase] += a.shape[0] + b.shape[0]
        if state.phase == "generator":
            G_ab, G_ba = models["generator_ab"], models["generator_ba"]
            D_a, D_b = models["discriminator_a"], models["discriminator_b"]
            fake_b, fake_a = G_ab(a).sample, G_ba(b).sample
            adversarial = self.loss_fns.g_loss(D_b(fake_b).scores) + self.loss_fns.g_loss(D_a(fake_a).scores)
            cycle = cycle_consistency_loss(G_ba(fake_b).sample, a) + cycle_consistency_loss(G_ab(fake_a).sample, b)
            loss = adversarial + opts.cycle_weight * cycle
            extra = {"g_adversarial": adversarial.detach(), "cycle": cycle.detach()}
            weight = opts.identity_weight * opts.cycle_weight
            if weight > 0:
                identity = identity_loss(G_ab(b).sample, b) + identity_loss(G_ba(a).sample, a)
                loss = loss + weight * identity
                extra["identity"] = identity.detach()
            self._fakes = {"a": fake_a.detach(), "b": fake_b.detach()}
            return loss, extra

        if self._fakes is None:
            raise RuntimeError("the cyclegan discriminator phase needs the fakes of the generator phase before it")
        fakes, self._fakes = self._fakes, None
        total, extra = 0.0, {}
        for key, real in (("a", a), ("b", b)):
            D = models[f"discriminator_{key}"]
            real_scores, fake_scores = D(real).scores, D(self.pools[key].query(fakes[key])).scores
            d_loss = self.loss_fns.d_loss(real_scores, fake_scores)
            total = total + d_loss
            extra[f"d_{key}"] = d_loss.detach()
        return total, extra

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        from hfx.metrics import DOMAIN_MEASURES, frechet_distance

        acc, opts = self.accelerator, self.options
        G = {"ab": acc.unwrap_model(models["generator_ab"]), "ba": acc.unwrap_model(models["generator_ba"])}
        columns: dict[str, list[torch.Tensor]] = {}

        def keep(name, value):
            columns.setdefault(name, []).append(acc.gather_for_metrics(value).cpu())

        grid = {"a": [], "b": []}
        for batch in loader:
            x, labels, domain = batch["pixel_values"], batch["labels"], batch[opts.domain_column]
            is_b = (domain == self.domain_ids[1]).long()
            keep("labels", labels)
            keep("is_b", is_b)
            out = torch.empty_like(x)
            rec = torch.empty_like(x)
            idt = torch.empty_like(x)
            for key, source, there, back in (("a", 0, G["ab"], G["ba"]), ("b", 1, G["ba"], G["ab"])):
                mask = is_b == source
                if mask.any():
                    out[mask] = there(x[mask]).sample
                    rec[mask] = back(out[mask]).sample
                    idt[mask] = back(x[mask]).sample
                    if len(grid[key]) < opts.grid_size:
                        grid[key].append(torch.stack([x[mask], out[mask], rec[mask]], 1)[:opts.grid_size])
            keep("cycle_l1", (rec - x).abs().flatten(1).mean(1))
            keep("identity_l1", (idt - x).abs().flatten(1).mean(1))
            if opts.evaluator:
                real_f, real_logits = self.evaluator().features_and_logits(x)
                fake_f, fake_logits = self.evaluator().features_and_logits(out.clamp(-1, 1))
                keep("real_features", real_f)
                keep("fake_features", fake_f)
                keep("real_pred", real_logits.argmax(1))
                keep("fake_pred", fake_logits.argmax(1))
            if opts.domain_measure:
                measure = DOMAIN_MEASURES[opts.domain_measure]
                keep("real_measure", measure(x).to(x.device))
                keep("fake_measure", measure(out).to(x.device))
        c = {k: torch.cat(v) for k, v in columns.items()}
        metrics: dict[str, float] = {}
        self._eval_counts = {}
        for key, source, target, direction in (("a", 0, 1, "a_to_b"), ("b", 1, 0, "b_to_a")):
            src, tgt = c["is_b"] == source, c["is_b"] == target
            self._eval_counts[direction] = int(src.sum())
            if not src.any():
                continue
            metrics[f"cycle_l1_{key}"] = float(c["cycle_l1"][src].mean())
            metrics[f"identity_l1_{key}"] = float(c["identity_l1"][src].mean())
            if opts.evaluator:
                metrics[f"class_preserved_{direction}"] = float((c["fake_pred"][src] == c["labels"][src]).double().mean())
                metrics[f"real_accuracy_{key}"] = float((c["real_pred"][src] == c["labels"][src]).double().mean())
                if tgt.sum() >= 2 and src.sum() >= 2:
                    metrics[f"fid_{direction}"] = frechet_distance(c["fake_features"][src], c["real_features"][tgt])
            if opts.domain_measure and tgt.any():
                median_src, median_tgt = c["real_measure"][src].median(), c["real_measure"][tgt].median()
                middle, sign = (median_src + median_tgt) / 2, torch.sign(median_tgt - median_src)
                metrics[f"in_target_{direction}"] = float(((c["fake_measure"][src] - middle) * sign > 0).double().mean())
                metrics[f"real_in_own_{key}"] = float(((c["real_measure"][src] - middle) * sign < 0).double().mean())
        if opts.grid_size > 0 and acc.is_main_process and grid["a"] and grid["b"]:
            write_sample_grids(self, {"translations-": self.translation_grid(grid)}, state.global_step)
        return metrics

    def translation_grid(self, grid):
        """Rows: real A, A -> B, back to A, real B, B -> A, back to B (the first ``grid_size`` of each)."""
        rows = []
        for key in ("a", "b"):
            triples = torch.cat(grid[key])[:self.options.grid_size]  # (n, 3, C, H, W)
            rows += [triples[:, j] for j in range(3)]
        n = min(len(r) for r in rows)
        return image_grid(torch.cat([r[:n] for r in rows]), rows=6)

    def evaluator(self):
        return trained_classifier(self)

    # ------------------------------------------------------------------------------------------ artifact
    def save(self, models, state_dicts, output_dir: Path) -> None:
        from hfx.pipelines import CycleGANPipeline

        kept = {name: with_weights(models[name], state_dicts[name]) for name in models}
        CycleGANPipeline(**kept, domain_names=self.domain_names).save_pretrained(output_dir)

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        opts, info = self.options, self.info
        a, b = self.domain_names
        g = {"base_channels": 64, "num_blocks": 9, **opts.generator}
        summary = (f"A CycleGAN between {a!r} (A) and {b!r} (B) {info.size}x{info.size} images, trained unpaired "
                   f"({self.train_sizes[0]} and {self.train_sizes[1]} training images): ResNet generators "
                   f"({g['num_blocks']} residual blocks, {g['base_channels']} base channels), PatchGAN discriminators, "
                   f"the {opts.loss} loss, cycle weight {opts.cycle_weight:g}, identity weight "
                   f"{opts.identity_weight * opts.cycle_weight:g}, image pools of {opts.pool_size}. The saved "
                   "CycleGANPipeline translates either way in one generator call.")
        if opts.evaluator:
            summary += (f" class_preserved_* is the share of translated eval images that the classifier at "
                        f"`{opts.evaluator}` still assigns to their source's class; FID is in that classifier's "
                        "features, against the real eval images of the target domain.")
        if opts.domain_measure:
            summary += (f" in_target_* is the share of translations whose {opts.domain_measure} lies on the target "
                        "domain's side of the midpoint between the two real domains' medians.")
        counts = getattr(self, "_eval_counts", {})
        extractor = f"penultimate features of the classifier at {opts.evaluator}" if opts.evaluator else None
        results = []
        for name, value in metrics.items():
            direction = "b_to_a" if name.endswith("b_to_a") or not name.endswith(("_a", "a_to_b")) else "a_to_b"
            results.append({"metric": name, "value": round(value, 6), "num_samples": counts.get(direction),
                            "extractor": extractor if name.startswith("fid") else None})
        return {"summary": summary, **({"eval_results": results} if results else {})}
