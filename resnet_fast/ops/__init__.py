"""Custom ops (torch.library) with autograd and fake implementations."""
from .bn_add_relu import bn_add_relu, bn_relu
from .conv import conv2d, fold_bn
from .conv_bn_train import bn_affine, conv_bn_stats, conv_bn_train, train_blocker, update_running_stats
from .block_train import block_forward_train_kernels, conv_bn_act_train_kernels
