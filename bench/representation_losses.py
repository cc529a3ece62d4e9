"""Loss parity and step time against the anchors: hfx ``clip_loss`` vs open_clip's ``ClipLoss`` and hfx ``nt_xent_loss``
vs lightly's ``NTXentLoss``, forward + backward on CPU, values compared and the time ratio hfx / anchor
(median of interleaved repeats, so drift in the machine's load hits both sides alike). Run it alone:

    python bench/representation_losses.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    from lightly.loss import NTXentLoss
    from open_clip.loss import ClipLoss

    from hfx.losses.contrastive import INIT_LOGIT_SCALE, clip_loss, nt_xent_loss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds\n")
    print("| loss | batch x dim | hfx value | anchor value | abs diff | hfx ms | anchor ms | ratio hfx/anchor |")
    print("|---|---|---|---|---|---|---|---|")
    anchor_clip, anchor_ntx = ClipLoss(), NTXentLoss(temperature=0.5)
    for n, d in ((256, 128), (1024, 256)):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, d, generator=g, requires_grad=True)
        b = torch.randn(n, d, generator=g, requires_grad=True)
        scale = torch.tensor(INIT_LOGIT_SCALE, requires_grad=True)
        cases = {
            "InfoNCE (CLIP) vs open_clip ClipLoss": (
                lambda a=a, b=b, s=scale: clip_loss(F.normalize(a, dim=1), F.normalize(b, dim=1), s),
                lambda a=a, b=b, s=scale: anchor_clip(F.normalize(a, dim=1), F.normalize(b, dim=1), s.exp())),
            "NT-Xent vs lightly NTXentLoss": (lambda a=a, b=b: nt_xent_loss(a, b, 0.5),
                                              lambda a=a, b=b: anchor_ntx(a, b)),
        }
        for name, (ours, theirs) in cases.items():
            mine, ref = float(ours().detach()), float(theirs().detach())
            repeats = 20 if n <= 256 else 4
            step_ours, step_theirs = (lambda f=ours: f().backward()), (lambda f=theirs: f().backward())
            for fn in (step_ours, step_theirs):  # warm-up
                fn()
            ours_t, theirs_t = [], []
            for _ in range(args.rounds):
                ours_t.append(timed(step_ours, repeats))
                theirs_t.append(timed(step_theirs, repeats))
            mo, mt = statistics.median(ours_t) * 1e3, statistics.median(theirs_t) * 1e3
            print(f"| {name} | {n} x {d} | {mine:.6f} | {ref:.6f} | {abs(mine - ref):.1e} | {mo:.2f} | {mt:.2f} | "
                  f"{mo / mt:.3f} |")


if __name__ == "__main__":
    main()
