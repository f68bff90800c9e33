"""FD-MobileNet (Qin et al., ICIP 2018, arXiv 1802.03750): MobileNet with fast downsampling.

The stem and the first blocks reach stride 32 within 12 layers, so most depthwise-separable blocks run on a
7x7 map (at 224 px) and the network costs 144 / 40 / 12 M multiply-adds at width 1x / 0.5x / 0.25x.

Parameter names follow the authors' released checkpoints exactly (``features.conv_0``, ``features.norm_0``,
``features.{dw,pw}_{conv,norm}_{i}``, ``classifier``) so their files load with ``strict=True``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# (stride, output channels at width 1x) of the 11 depthwise-separable blocks.
BLOCKS: tuple[tuple[int, int], ...] = (
    (2, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
    (1, 512), (1, 512), (1, 512), (1, 512), (1, 1024),
)
STEM_CHANNELS = 32
TOTAL_STRIDE = 32


def scaled(channels: int, width_mult: float) -> int:
    """Channel count at a width multiplier, truncated as the authors do (int(c * w))."""
    return max(1, int(channels * width_mult))


class FDMobileNet(nn.Module):
    """FD-MobileNet classifier.

    Args:
        width_mult: channel multiplier (the paper's 1x / 0.5x / 0.25x; any positive value works: the config
            checks the values users give, fdmobilenet.config.POSITIVE).
        num_classes: size of the classifier output (at least 1).
        dropout: dropout before the classifier (0 = none, as the paper).
        in_channels: input image channels.
    """

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        self.width_mult = width_mult
        self.num_classes = num_classes
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = scaled(STEM_CHANNELS, width_mult)
        layers["conv_0"] = nn.Conv2d(in_channels, channels, 3, stride=2, padding=1, bias=False)
        layers["norm_0"] = nn.BatchNorm2d(channels)
        layers["relu_0"] = nn.ReLU(inplace=True)
        for i, (stride, out) in enumerate(BLOCKS):
            out = scaled(out, width_mult)
            layers[f"dw_conv_{i}"] = nn.Conv2d(channels, channels, 3, stride=stride, padding=1,
                                               groups=channels, bias=False)
            layers[f"dw_norm_{i}"] = nn.BatchNorm2d(channels)
            layers[f"dw_relu_{i}"] = nn.ReLU(inplace=True)
            layers[f"pw_conv_{i}"] = nn.Conv2d(channels, out, 1, bias=False)
            layers[f"pw_norm_{i}"] = nn.BatchNorm2d(out)
            layers[f"pw_relu_{i}"] = nn.ReLU(inplace=True)
            channels = out
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))
