// Residual tail of a ResNet block: out = act(x * scale[c] + shift[c] + r),
// r = residual * res_scale[c] + res_shift[c] (downsample branch's folded BN) or r = residual,
// and its residual-free form bn_relu: out = act(x * scale[c] + shift[c]).
// Optional per-channel centres x_centre / res_centre only change what the backward sums: Σg·(x - x_centre[c])
// and Σg·(residual - res_centre[c]) instead of Σg·x and Σg·residual (accuracy when |mean| >> std; see
// bn_add_relu.cpp). A null centre pointer in the kernels means 0.
//
// Shared between the CPU kernels (bn_add_relu.cpp) and the CUDA kernels (bn_add_relu_cuda.cu):
// input validation, the layout description both backends index with, and the per-element pre-activation.
// Both ops run the same kernels; a compile-time kHasRes (template parameter) drops the residual's loads,
// stores and sums from the bn_relu instantiations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#if defined(__CUDACC__)
#define RESNET_FAST_HD __host__ __device__ __forceinline__
#else
#define RESNET_FAST_HD inline
#endif

namespace resnet_fast {

// How the 4-D tensors are laid out in memory. Both layouts are dense, so element i of the flat
// buffer has channel (i / hw) % c (NCHW) or i % c (NHWC / channels_last).
struct Layout {
  bool channels_last = false;
  int64_t n = 0, c = 0, hw = 0;
  int64_t numel = 0;
};

// Validates x, residual (nullptr: the op has none, bn_relu), scale, shift, res_scale, res_shift (only with a
// residual), grad_out (when not nullptr) and the optional centres x_centre, res_centre (res_centre only with a
// residual; same rules as scale), and returns the layout. Errors name the offending argument.
// `op` prefixes every message.
Layout check_inputs(const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                    const at::Tensor* residual, const std::optional<at::Tensor>& res_scale,
                    const std::optional<at::Tensor>& res_shift, const at::Tensor* grad_out,
                    const std::optional<at::Tensor>& x_centre, const std::optional<at::Tensor>& res_centre);

// Whether an optional tensor argument was given (present and defined).
inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Allocates an uninitialised tensor shaped like `like`, in the layout's memory format.
at::Tensor empty_in_layout(const at::Tensor& like, const Layout& layout);

// The backward's outputs: grad_x and grad_residual (uninitialised, x's layout) and the zeroed [C] sums
// sum_g, sum_gx, sum_gr in scale's dtype. Without a residual (bn_relu), grad_residual and sum_gr are
// undefined tensors (not allocated).
using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
BackwardOutputs empty_backward_outputs(const at::Tensor& x, const at::Tensor& scale, const Layout& layout,
                                       bool has_residual);

// bn_relu_backward's outputs: (grad_x, sum_g, sum_gx).
using BackwardOutputsNoRes = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Pre-activation of one element, in the math type A: x*s + b, plus r (kHasRes), or r*rs + rb when res_bn.
// The one definition both backends use, so bn_relu and bn_add_relu (and CPU and CUDA) round alike.
template <bool kHasRes, typename A>
RESNET_FAST_HD A pre_activation(A xf, A rf, A sc, A sh, A rsc, A rsh, bool res_bn) {
  A z = xf * sc + sh;
  if constexpr (kHasRes) z = z + (res_bn ? rf * rsc + rsh : rf);
  return z;
}

}  // namespace resnet_fast
