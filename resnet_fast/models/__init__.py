"""Model constructors: torchvision's ImageNet ResNets and the CIFAR ResNets of He et al., fused."""
from ..nn import reference  # the plain torch.nn mirrors of torchvision (re-exported for users)
from .cifar import CifarResNet, ZeroPadShortcut, resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202
from .resnet import (ResNet, resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d,
                     resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2)

__all__ = ["reference", "ResNet", "CifarResNet", "ZeroPadShortcut",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
           "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
           "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]
