"""The CIFAR ResNets of depth 6n+2 (He et al. 2016) used by the randomized-smoothing literature.

ResNet-20 (n=3) is the quick one; ResNet-110 (n=18) is the paper's CIFAR architecture. Projection shortcuts
(1×1 conv + BN) wherever the shape changes, as in the released code.
"""

from torch import Tensor, nn

from catrs.models.base import architecture


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for block in range(blocks_per_stage):
                stages.append(BasicBlock(in_planes, planes, stride if block == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(self.stages(self.stem(x)))
        return self.fc(out.flatten(1))


@architecture(in_channels=3)
def cifar_resnet20(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels)


@architecture(in_channels=3)
def cifar_resnet110(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(110, num_classes, in_channels)
