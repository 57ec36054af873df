"""convert(): swap a ResNet's blocks and stem for the fused modules; revert(): give plain torch modules back.

Blocks are found BY STRUCTURE, so torchvision's and timm's (and look-alikes) are covered: a module with
``conv1, bn1, conv2, bn2`` (and ``conv3, bn3`` for a Bottleneck) is a block. It is fused only when every part
is something the fused forward computes exactly: plain ``Conv2d`` (no bias, zero padding), plain
``BatchNorm2d`` with affine params and running stats, ReLU activations (``relu`` or timm's ``act1/2/3``),
``downsample`` None / Sequential(Conv2d, BatchNorm2d) / a parameter-free shortcut, and any other child an
Identity (timm's ``drop_block``, ``aa``). Anything else (SE, anti-aliasing, DropPath, custom or frozen norms,
non-ReLU activations) is left as it is and listed in the summary. The fused forward assumes torchvision's
order of operations (conv-bn-relu ..., add, relu), which is what these structures compute in torchvision/timm.

The stem (``conv1, bn1, relu|act1`` beside a ``layer1``) is fused by making ``conv1`` a FusedStemConv and
``bn1`` a pass-through FoldedBatchNorm2d with the same state, so the model's own forward is unchanged.

Fused modules SHARE the original Parameters and buffers: an optimiser built before convert keeps training the
same tensors, and ``state_dict()`` is identical (keys, values, order).
"""
from __future__ import annotations

import copy
import dataclasses

import torch.nn as tnn

from ._backend import implementations_of
from .nn.fusion import block_pairs, conv_bn_blocker, downsample_pair
from .nn.modules import BasicBlock, Bottleneck, FoldedBatchNorm2d, FoldedSyncBatchNorm2d, FusedStemConv
from .nn.reference import plain_classes
from .nn.sync_bn import SyncBatchNorm2d

_KNOWN = {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "act1", "act2", "act3", "downsample"}


@dataclasses.dataclass
class ConvertSummary:
    """What :func:`convert` did: fused module names, and (name, reason) for each block it left alone."""

    fused: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    sync_bn: int = 0

    def __str__(self):
        lines = [f"resnet_fast.convert: fused {len(self.fused)} module(s), left {len(self.skipped)} unfused, "
                 f"{self.sync_bn} BatchNorm2d synced"]
        lines += [f"  fused   {name}" for name in self.fused]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- module swapping
def retype(module: tnn.Module, cls: type) -> tnn.Module:
    """A new module of class ``cls`` that SHARES ``module``'s parameters, buffers, submodules and attributes.

    Parameters are the same objects (an optimiser built before keeps working) and the state_dict is unchanged.
    """
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in state:
            state[key] = type(state[key])(state[key])  # own containers, same tensors
    new.__dict__.update(state)
    return new


def to_sync_batch_norm(bn: tnn.BatchNorm2d, process_group=None) -> SyncBatchNorm2d:
    """``bn`` as a SyncBatchNorm2d sharing its parameters and buffers."""
    new = retype(bn, SyncBatchNorm2d)
    new.process_group = process_group
    return new


def _fuse_stem(conv: tnn.Conv2d, bn: tnn.BatchNorm2d, relu: tnn.Module, act_name: str):
    """(fused conv, folded bn, identity) to put in place of the stem's (conv1, bn1, ``act_name``)."""
    folded_cls = FoldedSyncBatchNorm2d if isinstance(bn, SyncBatchNorm2d) else FoldedBatchNorm2d
    folded = retype(bn, folded_cls)
    new = retype(conv, FusedStemConv)
    new.__dict__["_stem_bn"] = folded  # not a submodule: bn1 stays where it was in the state_dict
    new.__dict__["_stem_relu"] = relu  # what revert() puts back, and where
    new.__dict__["_stem_act"] = act_name
    return new, folded, tnn.Identity()


def _unfuse_stem(stem: FusedStemConv):
    """Plain (Conv2d, BatchNorm2d, activation) modules sharing the fused stem's parameters and buffers."""
    plain_bn = retype(stem._stem_bn, tnn.BatchNorm2d)
    conv = retype(stem, tnn.Conv2d)
    for key in ("_stem_bn", "_stem_relu", "_stem_act"):
        conv.__dict__.pop(key, None)
    return conv, plain_bn, stem._stem_relu


# ------------------------------------------------------------------------------------------ structure checks
def _is_block(module) -> bool:
    return all(isinstance(getattr(module, a, None), tnn.Module) for a in ("conv1", "bn1", "conv2", "bn2"))


def _block_problem(block) -> str | None:
    """Why ``block`` cannot be fused, or None."""
    for i, (conv, bn) in enumerate(block_pairs(block), 1):
        problem = conv_bn_blocker(conv, bn, "convert", names=(f"conv{i}", f"bn{i}"))
        if problem:
            return problem
    acts = [a for a in ("relu", "act1", "act2", "act3") if getattr(block, a, None) is not None]
    if not acts:
        return "no relu/act1 activation attribute"
    for a in acts:
        if type(getattr(block, a)) is not tnn.ReLU:
            return f"activation {a} is {type(getattr(block, a)).__name__}, not ReLU"
    ds = block.downsample if hasattr(block, "downsample") else None
    if ds is not None:
        pair = downsample_pair(ds)
        if pair is not None:
            problem = conv_bn_blocker(*pair, "convert", names=("downsample.0", "downsample.1"))
            if problem:
                return problem
        elif any(True for _ in ds.parameters()) or any(True for _ in ds.buffers()):
            return f"downsample {type(ds).__name__} is neither Sequential(Conv2d, BatchNorm2d) nor parameter-free"
    for name, child in block.named_children():
        if name not in _KNOWN and not isinstance(child, tnn.Identity):
            return f"has {name} ({type(child).__name__}), which the fused block does not compute"
    return None


def _stem(module):
    """(conv, bn, relu attribute name) when ``module`` has a fusable conv1/bn1/relu stem before a layer1."""
    if _is_block(module) or not hasattr(module, "layer1"):
        return None
    conv, bn = getattr(module, "conv1", None), getattr(module, "bn1", None)
    act = next((a for a in ("relu", "act1") if isinstance(getattr(module, a, None), tnn.Module)), None)
    if not isinstance(conv, tnn.Module) or not isinstance(bn, tnn.Module) or act is None:
        return None
    if conv_bn_blocker(conv, bn, "convert", names=("conv1", "bn1")) or type(getattr(module, act)) is not tnn.ReLU:
        return None
    return conv, bn, act


# ------------------------------------------------------------------------------------------------ convert
def _convert_children(module, prefix, summary):
    stem = _stem(module)
    if stem is not None:
        conv, bn, act = stem
        module.conv1, module.bn1, fused_act = _fuse_stem(conv, bn, getattr(module, act), act)
        setattr(module, act, fused_act)
        summary.fused.append(f"{prefix}conv1+bn1+{act}")
    for name, child in list(module.named_children()):
        qualname = prefix + name
        if isinstance(child, (BasicBlock, Bottleneck, FusedStemConv)):
            continue  # already fused
        if _is_block(child):
            problem = _block_problem(child)
            if problem is None:
                cls = Bottleneck if isinstance(getattr(child, "conv3", None), tnn.Module) else BasicBlock
                setattr(module, name, cls.from_block(child))
                summary.fused.append(qualname)
            else:
                summary.skipped.append((qualname, problem))
            continue
        _convert_children(child, qualname + ".", summary)


def _sync_all(module, process_group, summary):
    stem = getattr(module, "conv1", None)
    if isinstance(stem, FusedStemConv) and type(module.bn1) is FoldedBatchNorm2d:  # converted before
        synced = retype(module.bn1, FoldedSyncBatchNorm2d)
        synced.process_group = process_group
        module.bn1 = stem.__dict__["_stem_bn"] = synced  # the stem conv computes with this module
        summary.sync_bn += 1
    for name, child in list(module.named_children()):
        if type(child) is tnn.BatchNorm2d:
            setattr(module, name, to_sync_batch_norm(child, process_group))
            summary.sync_bn += 1
        else:
            _sync_all(child, process_group, summary)


def convert(model: tnn.Module, *, inplace: bool = False, sync_bn: bool = False, process_group=None,
            verbose: bool = False) -> tnn.Module:
    """Swap ``model``'s ResNet blocks and stem for fused modules that share its parameters and buffers.

    inplace: change ``model`` itself (else a deep copy, leaving ``model`` untouched).
    sync_bn: make every BatchNorm2d a :class:`~resnet_fast.nn.SyncBatchNorm2d` over ``process_group``.
    verbose: print the summary. The summary is also attached as ``model.resnet_fast_summary``.
    """
    if not isinstance(model, tnn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    summary = ConvertSummary()
    if sync_bn:
        if type(model) is tnn.BatchNorm2d:
            raise ValueError("convert(sync_bn=True): pass the model containing the BatchNorm2d, not the layer")
        _sync_all(model, process_group, summary)
    if _is_block(model):
        raise ValueError("convert: pass the model containing the block, not the block itself "
                         "(use resnet_fast.nn.BasicBlock.from_block / Bottleneck.from_block)")
    _convert_children(model, "", summary)
    model.resnet_fast_summary = summary
    if verbose:
        print(summary)
    return model


# ------------------------------------------------------------------------------------------- implementations
def conv_implementations(model: tnn.Module) -> dict:
    """Which implementation computed each fused conv of ``model`` in its latest eager calls:
    ``{conv's qualified name: {role: impl}}``, e.g. ``{"layer1.0.conv1": {"conv_bn_stats": "triton",
    "conv_bn_stats_backward": "cudnn"}, "layer1.0.downsample.0": {...}, "conv1": {...}}`` (the stem's conv).

    Roles: ``conv2d`` / ``conv2d_backward`` (eval forward, and its backward under autograd), ``conv_bn_stats`` /
    ``conv_bn_stats_backward`` (training forward and backward); impl: ``triton``, ``cudnn``, a cuDNN composite's
    fused form (``conv_folded``, ``cudnn_conv_relu``, ``cudnn_conv_add_relu``) or ``eager`` (the op's fallback).
    Convs not yet run (or run only under torch.compile, which records nothing) are absent; after
    :func:`resnet_fast.reset_stats` the record starts empty. The counts over all calls are in
    ``resnet_fast.stats()["impl_calls"]``."""
    if not isinstance(model, tnn.Module):
        raise TypeError(f"conv_implementations: expected an nn.Module, got {type(model).__name__}")
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, tnn.Conv2d):
            impls = implementations_of(module)
            if impls:
                out[name] = impls
    return out


# ------------------------------------------------------------------------------------------------- revert
def _plain_block_classes():
    src, _ = plain_classes()
    return src.BasicBlock, src.Bottleneck


def _plain_block(fused, plain_cls):
    new = plain_cls.__new__(plain_cls)
    tnn.Module.__init__(new)
    for name in type(fused)._child_order:
        setattr(new, name, getattr(fused, name))
    new.stride = fused.stride
    new.training = fused.training
    return new


def _revert_children(module, classes):
    stem = getattr(module, "conv1", None)
    if isinstance(stem, FusedStemConv):
        act = stem._stem_act
        module.conv1, module.bn1, relu = _unfuse_stem(stem)
        setattr(module, act, relu)
    for name, child in list(module.named_children()):
        if isinstance(child, BasicBlock):
            setattr(module, name, _plain_block(child, classes[0]))
        elif isinstance(child, Bottleneck):
            setattr(module, name, _plain_block(child, classes[1]))
        elif isinstance(child, SyncBatchNorm2d):
            setattr(module, name, retype(child, tnn.BatchNorm2d))
        if name in module._modules:
            _revert_children(module._modules[name], classes)


def revert(model: tnn.Module, *, inplace: bool = False) -> tnn.Module:
    """Plain torch modules back: torchvision's BasicBlock/Bottleneck (the reference mirrors without
    torchvision), Conv2d/BatchNorm2d/ReLU stem, BatchNorm2d for SyncBatchNorm2d. Same parameters/buffers."""
    if not inplace:
        model = copy.deepcopy(model)
    _revert_children(model, _plain_block_classes())
    model.__dict__.pop("resnet_fast_summary", None)
    return model
