"""ResNet-50 from torchvision, the architecture of the paper's ImageNet experiments."""

from torch import nn

from catrs.errors import UserError
from catrs.models.base import architecture


@architecture(in_channels=3)
def resnet50(num_classes: int, in_channels: int = 3) -> nn.Module:
    from torchvision.models import resnet50 as torchvision_resnet50

    if in_channels != 3:
        raise UserError("resnet50 takes 3-channel images")
    return torchvision_resnet50(weights=None, num_classes=num_classes)
