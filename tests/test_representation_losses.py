"""The contrastive and self-distillation losses equal their anchors (open_clip's ClipLoss, lightly's NTXentLoss,
facebookresearch/dino's DINOLoss restated), values and gradients; under 2 real processes the gathered loss
gives the gradient of one process on the global batch; the representation metrics equal direct computations."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfx.losses.contrastive import (
    INIT_LOGIT_SCALE,
    MAX_LOGIT_SCALE,
    clip_loss,
    dino_center,
    dino_loss,
    info_nce_loss,
    nt_xent_loss,
)
from hfx.metrics.representation import (
    feature_std,
    knn_accuracy,
    knn_predict,
    labels_per_class,
    linear_probe_accuracy,
    zero_shot_accuracy,
)


def _pair(n=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, requires_grad=True), torch.randn(n, d, generator=g, requires_grad=True)


def test_clip_loss_equals_open_clip_clip_loss_values_and_gradients():
    from open_clip.loss import ClipLoss

    a, b = _pair()
    scale = torch.tensor(INIT_LOGIT_SCALE, requires_grad=True)
    ours = clip_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), scale)
    ours.backward()
    grads = a.grad.clone(), b.grad.clone(), scale.grad.clone()
    a.grad = b.grad = scale.grad = None
    theirs = ClipLoss()(F.normalize(a, dim=1), F.normalize(b, dim=1), scale.exp())
    theirs.backward()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-6)
    for mine, reference in zip(grads, (a.grad, b.grad, scale.grad)):
        torch.testing.assert_close(mine, reference, atol=1e-6, rtol=1e-5)


def test_clip_loss_clamps_the_logit_scale_at_100():
    a, b = _pair()
    a, b = F.normalize(a.detach(), dim=1), F.normalize(b.detach(), dim=1)
    high = torch.tensor(10.0, requires_grad=True)  # exp(10) >> 100
    assert float(clip_loss(a, b, high)) == pytest.approx(float(clip_loss(a, b, torch.tensor(MAX_LOGIT_SCALE))))
    clip_loss(a, b, high).backward()
    assert float(high.grad) == 0.0  # clamped: no gradient pushes the scale further
    with pytest.raises(ValueError, match="must be the same"):
        clip_loss(a, b[:3], high)


def test_nt_xent_equals_lightly_values_and_gradients():
    from lightly.loss import NTXentLoss

    a, b = _pair(32, 8, seed=1)
    for temperature in (0.1, 0.5):
        ours = nt_xent_loss(a, b, temperature)
        ga, gb = torch.autograd.grad(ours, (a, b))
        theirs = NTXentLoss(temperature=temperature)(a, b)
        ta, tb = torch.autograd.grad(theirs, (a, b))
        assert float(ours) == pytest.approx(float(theirs), abs=1e-6)
        torch.testing.assert_close(ga, ta, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gb, tb, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nt_xent_loss(a, b, float("nan"))


def test_info_nce_with_a_queue_equals_the_moco_formula():
    q, k = _pair(8, 4, seed=2)
    queue = torch.randn(20, 4)
    t = 0.2
    qn, kn, queue_n = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    expected = torch.stack([-torch.log_softmax(torch.cat([(qn[i] @ kn[i])[None], queue_n @ qn[i]]) / t, 0)[0]
                            for i in range(8)]).mean()
    assert float(info_nce_loss(q, k, queue, t)) == pytest.approx(float(expected), abs=1e-6)


def _dino_reference(student, teacher, center, ts, tt):
    """facebookresearch/dino main_dino.py DINOLoss.forward, restated (ncrops chunks, skip same view)."""
    student_out = torch.cat(student) / ts
    student_out = student_out.chunk(len(student))
    teacher_out = F.softmax((torch.cat(teacher) - center) / tt, dim=-1).detach().chunk(len(teacher))
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def test_dino_loss_and_center_equal_the_reference():
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(6, 10, generator=g) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [torch.randn(6, 10, generator=g) for _ in range(2)]
    center = torch.randn(1, 10, generator=g) * 0.1
    expected = _dino_reference(student, teacher, center, 0.1, 0.04)
    assert float(dino_loss(student, teacher, center, 0.1, 0.04)) == pytest.approx(float(expected), rel=1e-6)
    new = dino_center(center, teacher, 0.9)
    torch.testing.assert_close(new, center * 0.9 + torch.cat(teacher).mean(0, keepdim=True) * 0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: One process of a 2-process gloo group: its half of the global batch through two linear towers, the gathered
#: loss, the gradients averaged over processes as DDP's reducer does; rank 0 saves them to argv[4].
_WORKER = """
import os, sys, torch, torch.distributed as dist, torch.nn.functional as F
from hfx.losses.contrastive import INIT_LOGIT_SCALE, clip_loss, nt_xent_loss
rank, port, loss_name, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
torch.manual_seed(0)
towers = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 4), "b": torch.nn.Linear(6, 4)})
scale = torch.nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
g = torch.Generator().manual_seed(1)
x, y = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
fa, fb = towers["a"](x[rank * 8:rank * 8 + 8]), towers["b"](y[rank * 8:rank * 8 + 8])
loss = clip_loss(F.normalize(fa, dim=1), F.normalize(fb, dim=1), scale) if loss_name == "clip" else nt_xent_loss(fa, fb, 0.5)
loss.backward()
grads = {f"towers.{n}": p.grad for n, p in towers.named_parameters()}
grads["scale"] = scale.grad if scale.grad is not None else torch.zeros(())
for grad in grads.values():
    dist.all_reduce(grad)
    grad /= 2
if rank == 0:
    torch.save({"grads": grads, "loss": loss.detach()}, out)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("loss_name", ["clip", "ntxent"])
def test_two_processes_of_b_give_the_gradient_of_one_process_of_2b(loss_name, tmp_path):
    import subprocess
    import sys

    script, out, port = tmp_path / "worker.py", tmp_path / "grads.pt", str(_free_port())
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port, loss_name, str(out)], env=env,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    saved = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    towers = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 4), "b": torch.nn.Linear(6, 4)})
    scale = torch.nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
    fa, fb = towers["a"](x), towers["b"](y)
    loss = clip_loss(F.normalize(fa, dim=1), F.normalize(fb, dim=1), scale) if loss_name == "clip" \
        else nt_xent_loss(fa, fb, 0.5)
    loss.backward()
    assert float(saved["loss"]) == pytest.approx(float(loss), abs=1e-6)  # each process: the global batch's loss
    single = {f"towers.{n}": p.grad for n, p in towers.named_parameters()}
    if loss_name == "clip":
        single["scale"] = scale.grad
    for name, grad in single.items():
        torch.testing.assert_close(saved["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------- metrics
def test_knn_equals_dinos_weighted_vote_written_out():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(50, 5)), rng.normal(size=(12, 5))
    labels = rng.integers(3, size=50)
    k, t = 7, 0.07
    tn, qn = train / np.linalg.norm(train, axis=1, keepdims=True), test / np.linalg.norm(test, axis=1, keepdims=True)
    expected = []
    for q in qn:
        sims = tn @ q
        top = np.argsort(-sims)[:k]
        votes = np.zeros(3)
        for i in top:
            votes[labels[i]] += math.exp(sims[i] / t)
        expected.append(votes.argmax())
    assert knn_predict(train, labels, test, k, t).tolist() == expected
    assert knn_accuracy(train, labels, test, np.array(expected), k, t) == 1.0
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        knn_predict(train, labels, test, 0)
    with pytest.raises(ValueError, match="NaN"):
        knn_accuracy(train * np.nan, labels, test, np.array(expected))


def test_linear_probe_separates_separable_features_and_zero_shot_ensembles_prompts():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 8)) * 5
    labels = rng.integers(4, size=200)
    features = centers[labels] + rng.normal(size=(200, 8)) * 0.3
    assert linear_probe_accuracy(features[:150], labels[:150], features[150:], labels[150:]) == 1.0
    prompts = centers[:, None, :] + rng.normal(size=(4, 3, 8)) * 0.1  # 3 prompts per class
    assert zero_shot_accuracy(features, labels, prompts) == 1.0
    assert zero_shot_accuracy(features, labels, prompts[[1, 0, 2, 3]]) < 0.8  # swapped classes are wrong
    with pytest.raises(ValueError, match="class_text_features"):
        zero_shot_accuracy(features, labels, prompts[:, :, :3])


def test_feature_std_detects_collapse_and_few_labels_picks_per_class():
    rng = np.random.default_rng(2)
    assert feature_std(rng.normal(size=(500, 64))) == pytest.approx(1.0, abs=0.05)
    collapsed = np.ones((500, 64)) + rng.normal(size=(500, 64)) * 1e-4
    assert feature_std(collapsed) < 0.01
    labels = np.repeat(np.arange(10), 30)
    picked = labels_per_class(labels, 10, seed=0)
    assert np.bincount(labels[picked]).tolist() == [10] * 10
    assert labels_per_class(labels, 10, seed=0).tolist() == picked.tolist()
    assert labels_per_class(labels, 10, seed=1).tolist() != picked.tolist()
    with pytest.raises(ValueError, match="per_class"):
        labels_per_class(labels, 0)
