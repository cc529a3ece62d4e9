"""Contrastive and self-distillation losses: CLIP's symmetric InfoNCE, SimCLR's NT-Xent, MoCo's InfoNCE with a
queue, DINO's cross-entropy to a centred, sharpened teacher, and the all-gather that makes them exact under DDP.

Several processes: every loss here that compares a sample with the whole batch takes the features of the
GLOBAL batch. :func:`gather_with_local_grad` concatenates every process's features (in process order), the
local ones keeping their gradient and the others constants (open_clip's default, ``gather_with_grad=False``),
and multiplies the local gradient by the number of processes. DDP averages gradients over processes, so the
gradient every process applies is then the gradient of the loss of the global batch on ONE process: 2
processes x B equal 1 process x 2B (tested), without sending gradients through the gather.

All functions are pure: tensors in, tensors out; nothing is kept between calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: CLIP's initial logit scale (``ln(1 / 0.07)``) and its ceiling (``ln(100)``): the temperature is learnt, and
#: clamped so that the scale never exceeds 100 (Radford et al. 2021; open_clip clamps at ``ln(100)``).
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_local_grad(features: torch.Tensor) -> torch.Tensor:
    """Every process's ``features`` (B, ...) concatenated in process order (W * B, ...).

    The local rows keep their gradient, scaled by the world size W (see the module docstring); the other
    rows are constants. With one process, ``features`` itself. Every process must pass the same shape."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return features
    gathered = [torch.empty_like(features) for _ in range(size)]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[rank] = _ScaleGrad.apply(features, float(size))
    return torch.cat(gathered, dim=0)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              logit_bias: torch.Tensor | None = None, *, gather: bool = True) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: the mean of the image->text and text->image cross-entropies of
    ``exp(logit_scale) * image @ text.T`` with the matching pairs on the diagonal; equal to open_clip's
    ``ClipLoss()(image, text, logit_scale.exp())`` (tested).

    Args:
        image_features, text_features: (B, D) embeddings of B matching pairs, L2-normalised by the caller.
        logit_scale: the learnt LOG scale (a scalar parameter, ``INIT_LOGIT_SCALE`` at the start); it is
            clamped to [0, ``MAX_LOGIT_SCALE``] here, so the temperature never falls below 1 / 100.
        logit_bias: SigLIP-style additive bias, or None.
        gather: under several processes, compare against the global batch (:func:`gather_with_local_grad`).
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must be the same (B, D)")
    if gather:
        image_features, text_features = gather_with_local_grad(image_features), gather_with_local_grad(text_features)
    scale = logit_scale.clamp(0, MAX_LOGIT_SCALE).exp()
    logits = scale * image_features.float() @ text_features.float().T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent: for each of the 2N views, the cross-entropy of picking its other view among the
    2N - 1 others by cosine similarity / ``temperature``; the mean over the 2N views. Equal to lightly's
    ``NTXentLoss(temperature)`` (tested).

    Args:
        z1, z2: (N, D) projections of the two views of N images (normalised here).
        temperature: > 0 (SimCLR: 0.5 for small batches, 0.1 for large ones).
        gather: under several processes, the negatives are the global batch's.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must be the same (N, D)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    if gather:
        z1, z2 = gather_with_local_grad(z1), gather_with_local_grad(z2)
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, labels)


def info_nce_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None, temperature: float = 0.2
                  ) -> torch.Tensor:
    """MoCo's InfoNCE: each query's positive is its own key, its negatives the ``queue`` (K, D) of earlier
    keys (and, with ``queue=None``, the other keys of the batch). Inputs are normalised here; MoCo v2's
    temperature is 0.2. Returns the mean cross-entropy over the N queries."""
    if query.shape != key.shape or query.ndim != 2:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must be the same (N, D)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    query, key = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
    if queue is None:
        logits = query @ key.T
        labels = torch.arange(query.shape[0], device=query.device)
    else:
        positive = (query * key).sum(1, keepdim=True)
        logits = torch.cat([positive, query @ F.normalize(queue.float(), dim=1).T], dim=1)
        labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits / temperature, labels)


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> torch.Tensor:
    """DINO's self-distillation loss (Caron et al. 2021, ``DINOLoss`` of facebookresearch/dino).

    Args:
        student: the student head's logits (B, K) for every crop, the global crops first.
        teacher: the teacher head's logits (B, K) for the global crops only (no gradient needed).
        center: (K,) or (1, K), the running mean of the teacher's logits, subtracted before sharpening.
        student_temperature, teacher_temperature: the softmax temperatures (the teacher's sharper: 0.04-0.07).

    Returns the mean, over every (teacher crop, student crop) pair of DIFFERENT crops, of the cross-entropy
    between ``softmax((teacher - center) / t_T)`` and ``softmax(student / t_S)``.
    """
    if not student_temperature > 0 or not teacher_temperature > 0:
        raise ValueError("student_temperature and teacher_temperature must be > 0")
    targets = [F.softmax((t.float() - center) / teacher_temperature, dim=-1).detach() for t in teacher]
    log_probs = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student]
    total, terms = 0.0, 0
    for i, target in enumerate(targets):
        for j, log_p in enumerate(log_probs):
            if i == j:  # the same view: skip
                continue
            total = total + (-target * log_p).sum(-1).mean()
            terms += 1
    return total / terms


@torch.no_grad()
def dino_center(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float = 0.9) -> torch.Tensor:
    """DINO's new center: ``momentum * center + (1 - momentum) * mean of the teacher logits`` over every global
    crop of the GLOBAL batch (all-reduced across processes). Returns a new (1, K) tensor."""
    import torch.distributed as dist

    logits = torch.cat([t.float() for t in teacher])
    batch_sum = logits.sum(0, keepdim=True)
    count = torch.tensor(float(logits.shape[0]), device=logits.device)
    if world()[1] > 1:
        dist.all_reduce(batch_sum)
        dist.all_reduce(count)
    return center * momentum + batch_sum / count * (1 - momentum)
