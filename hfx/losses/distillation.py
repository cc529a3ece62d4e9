"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student matches the teacher's softened class
distribution as well as the labels.

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

The T^2 keeps the soft term's gradients on the scale of the hard term's as T changes (the gradient of the
softened KL shrinks as 1 / T^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    Args:
        student_logits, teacher_logits: (B, C) logits (the teacher's are treated as constants).
        temperature: T > 0; 1 compares the plain distributions.

    Returns:
        A scalar tensor (nats x T^2).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """``alpha`` x :func:`soft_target_loss` + (1 - ``alpha``) x cross-entropy with ``labels`` ((B,) class indices).
    ``alpha`` in [0, 1]: 0 is plain supervised training, 1 learns from the teacher alone."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    hard = F.cross_entropy(student_logits.float(), labels)
    if alpha == 0.0:
        return hard
    return alpha * soft_target_loss(student_logits, teacher_logits, temperature) + (1.0 - alpha) * hard


def hard_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT's hard-label distillation (Touvron et al. 2021): cross-entropy of the student with the teacher's
    argmax as the label, ``CE(z_s, argmax z_t)``, averaged over the batch.

    Args:
        student_logits, teacher_logits: (B, C) logits (the teacher's only pick the labels).

    Returns:
        A scalar tensor (nats).
    """
    return F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(-1))
