"""Custom ops (torch.library) with autograd and fake implementations."""
from .bn_add_relu import bn_add_relu
from .conv import conv2d, fold_bn
