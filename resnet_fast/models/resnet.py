"""torchvision's ImageNet ResNet constructors (same signatures, parameters, state_dict and init), fused.

Each builds torchvision's structure (:mod:`.reference`) and converts it in place, so every block and the stem
run the fused forward; anything :func:`resnet_fast.convert` cannot fuse (e.g. a non-BatchNorm ``norm_layer``)
stays a plain block and is listed in ``model.resnet_fast_summary``. There is no network here: only
``weights=None`` is accepted.
"""
from __future__ import annotations

from ..nn import reference


class ResNet(reference.ResNet):
    """torchvision's ResNet; ``fused=True`` (default) converts its blocks and stem to the fused modules."""

    def __init__(self, block, layers, num_classes=1000, zero_init_residual=False, groups=1, width_per_group=64,
                 replace_stride_with_dilation=None, norm_layer=None, fused=True):
        super().__init__(block, layers, num_classes, zero_init_residual, groups, width_per_group,
                         replace_stride_with_dilation, norm_layer)
        if fused:
            from ..convert import convert
            convert(self, inplace=True)


def _check_weights(name, weights, kwargs):
    if weights is not None:
        raise ValueError(f"{name}: weights={weights!r} is not supported (no download here); pass weights=None and "
                         "load a torchvision checkpoint with model.load_state_dict(...), the keys are identical")
    kwargs.pop("progress", None)


def _resnet(name, block, layers, **defaults):
    def build(*, weights=None, progress=True, **kwargs):
        _check_weights(name, weights, kwargs)
        for key, value in defaults.items():
            kwargs.setdefault(key, value)
        return ResNet(block, layers, **kwargs)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"torchvision's ``{name}`` (``weights=None`` only), fused unless ``fused=False``."
    return build


B, BN = reference.BasicBlock, reference.Bottleneck
resnet18 = _resnet("resnet18", B, [2, 2, 2, 2])
resnet34 = _resnet("resnet34", B, [3, 4, 6, 3])
resnet50 = _resnet("resnet50", BN, [3, 4, 6, 3])
resnet101 = _resnet("resnet101", BN, [3, 4, 23, 3])
resnet152 = _resnet("resnet152", BN, [3, 8, 36, 3])
resnext50_32x4d = _resnet("resnext50_32x4d", BN, [3, 4, 6, 3], groups=32, width_per_group=4)
resnext101_32x8d = _resnet("resnext101_32x8d", BN, [3, 4, 23, 3], groups=32, width_per_group=8)
resnext101_64x4d = _resnet("resnext101_64x4d", BN, [3, 4, 23, 3], groups=64, width_per_group=4)
wide_resnet50_2 = _resnet("wide_resnet50_2", BN, [3, 4, 6, 3], width_per_group=128)
wide_resnet101_2 = _resnet("wide_resnet101_2", BN, [3, 4, 23, 3], width_per_group=128)
del B, BN
