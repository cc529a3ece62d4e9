"""The FID Inception-v3: the network of the TensorFlow FID code (``pt_inception-2015-12-05``), in torch.

It is torchvision's Inception-v3 with 1008 classes and four blocks whose pooling branch differs
(average pooling that ignores padding, one max pooling), exactly as pytorch-fid's ``fid_inception_v3``
and torch-fidelity's ``FeatureExtractorInceptionV3`` rebuild it. Its state dict uses torchvision's names,
so pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` loads as is. No weights ship with hfx and none
are downloaded: pass the local file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

FID_INCEPTION_CLASSES = 1008
FID_INCEPTION_SIZE = 299


def _avg_pool_without_padding(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pooling does not count the zero padding in the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def _forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_without_padding(x))]


class FIDInceptionC(InceptionC):
    def _forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_without_padding(x))]


class FIDInceptionE(InceptionE):
    """Mixed_7b (``max_pool=False``: average pooling without padding) or Mixed_7c (max pooling)."""

    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_without_padding(x)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)]


class FIDInceptionV3(nn.Module):
    """Inception-v3 as FID uses it: ``[B, 3, 299, 299]`` in [-1, 1] -> pool3 ``[B, 2048]`` and logits ``[B, 1008]``.

    The logits are ``pool3 @ fc.weight.T`` without the bias: torch-fidelity's ``logits_unbiased``, the
    logits the original TensorFlow Inception Score code uses.
    """

    def __init__(self):
        super().__init__()
        net = Inception3(num_classes=FID_INCEPTION_CLASSES, aux_logits=False, init_weights=False)
        net.Mixed_5b = FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        net.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        # Same attribute names as torchvision/pytorch-fid, so their state dicts load without renaming.
        for name, module in net.named_children():
            if name not in ("dropout", "AuxLogits"):
                self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x)))
        x = self.maxpool2(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool3 = torch.flatten(self.avgpool(x), 1)
        return pool3, F.linear(pool3, self.fc.weight)
