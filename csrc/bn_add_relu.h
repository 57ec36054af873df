// Residual tail of a ResNet block: out = act(x * scale[c] + shift[c] + r),
// r = residual * res_scale[c] + res_shift[c] (downsample branch's folded BN) or r = residual.
//
// Shared between the CPU kernels (bn_add_relu.cpp) and the CUDA kernels (bn_add_relu_cuda.cu):
// input validation and the layout description both backends index with.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace resnet_fast {

// How the 4-D tensors are laid out in memory. Both layouts are dense, so element i of the flat
// buffer has channel (i / hw) % c (NCHW) or i % c (NHWC / channels_last).
struct Layout {
  bool channels_last = false;
  int64_t n = 0, c = 0, hw = 0;
  int64_t numel = 0;
};

// Validates x, residual, scale, shift, res_scale, res_shift (and grad_out when defined) and returns
// the layout. Errors name the offending argument. `op` prefixes every message.
Layout check_inputs(const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                    const at::Tensor& residual, const std::optional<at::Tensor>& res_scale,
                    const std::optional<at::Tensor>& res_shift, const at::Tensor* grad_out);

// Allocates an uninitialised tensor shaped like `like`, in the layout's memory format.
at::Tensor empty_in_layout(const at::Tensor& like, const Layout& layout);

// The backward's outputs: grad_x and grad_residual (uninitialised, x's layout) and the zeroed [C] sums
// sum_g, sum_gx, sum_gr in scale's dtype.
using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
BackwardOutputs empty_backward_outputs(const at::Tensor& x, const at::Tensor& scale, const Layout& layout);

}  // namespace resnet_fast
