"""Backbones: image -> multi-scale feature maps (strides 8, 16, 32).

Every backbone takes RGB in [0, 1] (N, 3, H, W) and normalises inside, so the
exported graph can take raw pixels and the normalisation travels with the weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import BackboneConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the paper's pixel norm (123.675, 116.28, 103.53) / 255
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c, 1), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.body(x))


class SmallCNN(nn.Module):
    """A small residual CNN trained from scratch (CPU recipes)."""

    def __init__(self, channels: list[int]):
        super().__init__()
        c1, c2, c3 = channels
        stem = c1 // 2
        self.stem = nn.Sequential(_conv_bn(3, stem, 2), _conv_bn(stem, stem, 1), _conv_bn(stem, c1, 2))  # stride 4
        self.stage1 = nn.Sequential(_conv_bn(c1, c1, 2), ResBlock(c1))  # 8
        self.stage2 = nn.Sequential(_conv_bn(c1, c2, 2), ResBlock(c2))  # 16
        self.stage3 = nn.Sequential(_conv_bn(c2, c3, 2), ResBlock(c3))  # 32
        self.out_channels = (c1, c2, c3)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x01: Tensor) -> list[Tensor]:
        x = self.stem((x01 - self.mean) / self.std)
        f8 = self.stage1(x)
        f16 = self.stage2(f8)
        return [f8, f16, self.stage3(f16)]


class EfficientNetBackbone(nn.Module):
    def __init__(self, pretrained: bool):
        super().__init__()
        from .efficientnet_lite import EfficientNetLite0, load_pretrained  # only the backbone a recipe names

        self.net = EfficientNetLite0()
        if pretrained:
            load_pretrained(self.net)
        del self.net._conv_head, self.net._bn1, self.net._fc  # not needed for features
        self.out_channels = self.net.out_channels

    def forward(self, x01: Tensor) -> list[Tensor]:
        return self.net(self.net.normalise(x01))


class TimmBackbone(nn.Module):
    """Any timm model with `features_only` (GPU recipes); weights from a local file only."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        try:
            import timm  # optional: not installed by the train extra
        except ImportError as e:
            raise RuntimeError("backbone 'timm' needs the package timm") from e
        self.net = timm.create_model(cfg.timm_name, pretrained=False, features_only=True, out_indices=(-3, -2, -1))
        if cfg.path:
            state = torch.load(cfg.path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state, strict=False)
        self.out_channels = tuple(self.net.feature_info.channels())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x01: Tensor) -> list[Tensor]:
        return list(self.net((x01 - self.mean) / self.std))


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    if cfg.name == "siglip_vit_b16":
        from .vit import ViTPyramid, load_vit_weights  # only the backbone a recipe names

        vit = ViTPyramid(768, 12, 12, 16)
        if cfg.path:
            load_vit_weights(vit, cfg.path)
        return vit
    if cfg.name == "small_cnn":
        return SmallCNN(cfg.channels)
    if cfg.name == "efficientnet_lite0":
        return EfficientNetBackbone(cfg.pretrained)
    if cfg.name == "timm":
        return TimmBackbone(cfg)
    raise ValueError(
        f"model.backbone.name: unknown backbone {cfg.name!r} (small_cnn, efficientnet_lite0, siglip_vit_b16, timm)"
    )
