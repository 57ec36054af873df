// Residual tail op and its residual-free form: schema (TORCH_LIBRARY), input validation and the CPU kernels.
//
//   bn_add_relu(x, scale, shift, residual, res_scale=None, res_shift=None, relu=True, x_centre=None,
//               res_centre=None) -> out
//     out = act(x * scale[c] + shift[c] + r),  r = residual * res_scale[c] + res_shift[c]  or  residual
//     (the centres do not change the output; the forward only validates them, so that autograd can hand
//     them to the backward)
//   bn_add_relu_backward(grad_out, x, scale, shift, residual, res_scale, res_shift, relu, x_centre=None,
//                        res_centre=None) -> (grad_x, grad_residual, sum_g, sum_gx, sum_gr)
//     g = grad_out masked by (pre-activation > 0) when relu, recomputed from the inputs;
//     grad_x = g * scale[c], grad_residual = g * res_scale[c] (or g), and the per-channel sums
//     sum_g = Σg, sum_gx = Σ g·(x - x_centre[c]), sum_gr = Σ g·(residual - res_centre[c]) that the BatchNorm
//     backward needs (a centre that is None counts as 0: Σ g·x, Σ g·residual).
//   bn_relu(x, scale, shift, relu=True, x_centre=None) -> out = act(x * scale[c] + shift[c])
//   bn_relu_backward(grad_out, x, scale, shift, relu, x_centre=None) -> (grad_x, sum_g, sum_gx), as above
//     without a residual.
//
// Why centres: in training x is a raw conv output and scale = gamma*invstd, shift = beta - mean*scale, so the
// BatchNorm backward needs Σg·(x - mean) = Σg·x - mean·Σg. For a channel with |mean| >> std the fp32
// accumulation error of Σg·x (~eps·Σ|g·x|) dwarfs that difference. With x_centre = mean (detached) every
// product is formed from the exact difference x - mean and the caller rebuilds Σg·x = sum_gx + mean·sum_g
// with one rounding (resnet_fast/ops/bn_add_relu.py), as conv_bn_stats does with its in_centre.
//
// Both ops run the same kernels (below, and in bn_add_relu_cuda.cu): the template parameter kHasRes is false
// for bn_relu, which removes the residual's reads, the grad_residual write and the Σ g·residual sum.
//
// x/residual/grad_out: 4-D, same shape/dtype (float32, float16, bfloat16, float64), NCHW-contiguous or
// channels_last; scale/shift/res_*: [C] float32 (float64 when x is float64). Math is in float32 (float64 for
// float64). Reductions are deterministic: per-plane (NCHW) or per-row-chunk (NHWC) partials, where the
// partition depends only on the shape, summed in a fixed order.
#include "bn_add_relu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <Python.h>
#include <pybind11/pybind11.h>

#include <tuple>
#include <vector>

namespace resnet_fast {

namespace {

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

void check_vector(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x, int64_t c) {
  TORCH_CHECK_VALUE(v.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK_VALUE(v.device() == x.device(), op, ": ", name, " is on ", v.device(), " but x is on ", x.device(),
                    "; all tensors must be on the same device");
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(v.scalar_type() == want, op, ": ", name, " must be ", want, " (per-channel parameters are ",
                    want, " for x of dtype ", x.scalar_type(), "), got ", v.scalar_type());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == c, op, ": ", name, " must have shape [C] = [", c,
                    "] to match x.shape[1], got shape ", shape_str(v));
  TORCH_CHECK_VALUE(v.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                  at::MemoryFormat fmt) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                    "; all tensors must be on the same device");
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                    " but x has dtype ", x.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " has shape ", shape_str(t), " but x has shape ",
                    shape_str(x), "; they must match");
  TORCH_CHECK_VALUE(t.is_contiguous(fmt), op, ": ", name, " must be dense in the same memory format as x (",
                    fmt == at::MemoryFormat::ChannelsLast ? "channels_last" : "NCHW-contiguous",
                    "), got strides ", c10::str(t.strides()), "; mixed layouts and strided views are not supported,"
                    " call .contiguous(memory_format=...) first");
}

}  // namespace

Layout check_inputs(const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                    const at::Tensor* residual, const std::optional<at::Tensor>& res_scale,
                    const std::optional<at::Tensor>& res_shift, const at::Tensor* grad_out,
                    const std::optional<at::Tensor>& x_centre, const std::optional<at::Tensor>& res_centre) {
  TORCH_CHECK_VALUE(x.defined(), op, ": x must be a tensor");
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be a 4-D (N, C, H, W) tensor, got a ", x.dim(),
                    "-D tensor of shape ", shape_str(x));
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
                    ": x must be float32, float16, bfloat16 or float64, got ", dt);
  // A tensor can be both (size-1 dims, or N == 0); the layouts then index identically, and the strides
  // decide which format the output gets. Same rule as _memory_format() in resnet_fast/ops/bn_add_relu.py.
  const bool nchw = x.is_contiguous(), nhwc = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::MemoryFormat fmt;
  if (nhwc && (!nchw || x.stride(1) < x.stride(3))) {
    fmt = at::MemoryFormat::ChannelsLast;
  } else if (nchw) {
    fmt = at::MemoryFormat::Contiguous;
  } else {
    TORCH_CHECK_VALUE(false, op, ": x must be dense NCHW-contiguous or channels_last, got strides ",
                      c10::str(x.strides()), " for shape ", shape_str(x),
                      "; strided views are not supported, call .contiguous(memory_format=...) first");
  }
  if (residual != nullptr) check_like_x(op, "residual", *residual, x, fmt);
  if (grad_out != nullptr) check_like_x(op, "grad_out", *grad_out, x, fmt);
  const int64_t c = x.size(1);
  check_vector(op, "scale", scale, x, c);
  check_vector(op, "shift", shift, x, c);
  const bool has_rs = given(res_scale);
  const bool has_rb = given(res_shift);
  TORCH_INTERNAL_ASSERT(residual != nullptr || !(has_rs || has_rb), op, ": res_scale/res_shift without a residual");
  TORCH_CHECK_VALUE(has_rs == has_rb, op, ": res_scale and res_shift must be given together (got ",
                    has_rs ? "res_scale" : "res_shift", " only)");
  if (has_rs) {
    check_vector(op, "res_scale", *res_scale, x, c);
    check_vector(op, "res_shift", *res_shift, x, c);
  }
  if (given(x_centre)) check_vector(op, "x_centre", *x_centre, x, c);
  if (given(res_centre)) {
    TORCH_CHECK_VALUE(residual != nullptr, op, ": res_centre needs a residual");
    check_vector(op, "res_centre", *res_centre, x, c);
  }
  Layout l;
  l.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  l.n = x.size(0);
  l.c = c;
  l.hw = x.size(2) * x.size(3);
  l.numel = x.numel();
  return l;
}

at::Tensor empty_in_layout(const at::Tensor& like, const Layout& layout) {
  return at::empty(like.sizes(), like.options().memory_format(layout.channels_last ? at::MemoryFormat::ChannelsLast
                                                                                      : at::MemoryFormat::Contiguous));
}

BackwardOutputs empty_backward_outputs(const at::Tensor& x, const at::Tensor& scale, const Layout& layout,
                                       bool has_residual) {
  const auto sum = [&] { return at::zeros({layout.c}, scale.options()); };
  return {empty_in_layout(x, layout), has_residual ? empty_in_layout(x, layout) : at::Tensor(), sum(), sum(),
          has_residual ? sum() : at::Tensor()};
}

namespace {

// Work per parallel_for task, in elements: large enough to amortise scheduling, small enough to balance.
constexpr int64_t kGrainElems = 32768;
// Independent accumulator lanes so the reduction loops vectorise without reassociating float sums.
constexpr int kLanes = 8;

// Template parameters of the kernels: kHasRes (false for bn_relu: no residual pointer is ever read or
// written), kResBN (residual has its own affine; implies kHasRes), kRelu.
template <typename T, typename A, bool kHasRes, bool kResBN, bool kRelu>
void forward_cpu(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ out, const A* __restrict__ s,
                 const A* __restrict__ b, const A* __restrict__ rs, const A* __restrict__ rb, const Layout& L) {
  static_assert(kHasRes || !kResBN, "a residual affine needs a residual");
  if (!L.channels_last) {
    // NCHW: each (n, c) plane is contiguous and has one channel, so the inner loop has scalar parameters.
    const int64_t planes = L.n * L.c, hw = L.hw;
    at::parallel_for(0, planes, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(hw, 1)),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % L.c;
        const A sc = s[c], sh = b[c], rsc = kResBN ? rs[c] : A(1), rsh = kResBN ? rb[c] : A(0);
        const T* xp = x + p * hw;
        const T* rp = kHasRes ? r + p * hw : nullptr;
        T* op = out + p * hw;
        for (int64_t j = 0; j < hw; ++j) {
          const A rf = kHasRes ? static_cast<A>(rp[j]) : A(0);
          A z = pre_activation<kHasRes>(static_cast<A>(xp[j]), rf, sc, sh, rsc, rsh, kResBN);
          if (kRelu) z = z > A(0) ? z : A(0);
          op[j] = static_cast<T>(z);
        }
      }
    });
  } else {
    // NHWC: rows of C contiguous channels; the inner loop runs over channels.
    const int64_t rows = L.n * L.hw, C = L.c;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1)),
                     [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const T* xp = x + m * C;
        const T* rp = kHasRes ? r + m * C : nullptr;
        T* op = out + m * C;
        for (int64_t c = 0; c < C; ++c) {
          const A rf = kHasRes ? static_cast<A>(rp[c]) : A(0);
          A z = pre_activation<kHasRes>(static_cast<A>(xp[c]), rf, s[c], b[c], kResBN ? rs[c] : A(1),
                                        kResBN ? rb[c] : A(0), kResBN);
          if (kRelu) z = z > A(0) ? z : A(0);
          op[c] = static_cast<T>(z);
        }
      }
    });
  }
}

// One element of the backward, at flat index i: returns g (grad_out after the ReLU mask) and writes grad_x and
// (kHasRes) grad_residual; *rf is the residual as A (0 without one) for the Σ g·residual sum.
template <typename T, typename A, bool kHasRes, bool kResBN, bool kRelu>
inline A backward_elem(const T* go, const T* x, const T* r, T* gx, T* gr, int64_t i, A sc, A sh, A rsc, A rsh,
                       A* xf, A* rf) {
  *xf = static_cast<A>(x[i]);
  *rf = kHasRes ? static_cast<A>(r[i]) : A(0);
  A g = static_cast<A>(go[i]);
  if (kRelu) g = pre_activation<kHasRes>(*xf, *rf, sc, sh, rsc, rsh, kResBN) > A(0) ? g : A(0);
  gx[i] = static_cast<T>(g * sc);
  if (kHasRes) gr[i] = static_cast<T>(kResBN ? g * rsc : g);
  return g;
}

// Sums: Q = 3 (Σg, Σg·(x - xc), Σg·(r - rc)) with a residual, 2 without.
template <bool kHasRes>
constexpr int num_sums() { return kHasRes ? 3 : 2; }

// xc, rc: the per-channel centres of the Σg·x and Σg·r sums, or nullptr for 0 (then x - 0 == x exactly: the
// same bits as without the centre).
template <typename T, typename A, bool kHasRes, bool kResBN, bool kRelu>
void backward_cpu(const T* __restrict__ go, const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ gx,
                  T* __restrict__ gr, const A* __restrict__ s, const A* __restrict__ b, const A* __restrict__ rs,
                  const A* __restrict__ rb, const A* __restrict__ xc, const A* __restrict__ rc, A* sum_g,
                  A* sum_gx, A* sum_gr, const Layout& L) {
  static_assert(kHasRes || !kResBN, "a residual affine needs a residual");
  constexpr int Q = num_sums<kHasRes>();
  A* const sums[3] = {sum_g, sum_gx, sum_gr};
  const int64_t C = L.c;
  // An absent centre reads as a [C] vector of zeros, so the inner loops load it unconditionally (no per-element
  // branch in the vectorised NHWC loop).
  std::vector<A> zeros(xc == nullptr || (kHasRes && rc == nullptr) ? C : 0, A(0));
  xc = xc != nullptr ? xc : zeros.data();
  rc = !kHasRes || rc != nullptr ? rc : zeros.data();
  if (!L.channels_last) {
    // NCHW: one partial per (n, c) plane, computed sequentially by one task (lane accumulators), then
    // summed over n in order: the result does not depend on the thread count.
    const int64_t planes = L.n * C, hw = L.hw;
    std::vector<A> part(Q * planes);
    at::parallel_for(0, planes, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(hw, 1)),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % C;
        const A sc = s[c], sh = b[c], rsc = kResBN ? rs[c] : A(1), rsh = kResBN ? rb[c] : A(0);
        const A xcen = xc[c];
        [[maybe_unused]] const A rcen = kHasRes ? rc[c] : A(0);
        const int64_t off = p * hw;
        A acc[Q][kLanes] = {};
        const auto step = [&](int64_t i, int l) {
          A xf, rf;
          const A g = backward_elem<T, A, kHasRes, kResBN, kRelu>(go, x, r, gx, gr, i, sc, sh, rsc, rsh, &xf, &rf);
          acc[0][l] += g;
          acc[1][l] += g * (xf - xcen);
          if constexpr (kHasRes) acc[2][l] += g * (rf - rcen);
        };
        int64_t j = 0;
        for (; j + kLanes <= hw; j += kLanes) {
          for (int l = 0; l < kLanes; ++l) step(off + j + l, l);
        }
        for (int l = 0; j < hw; ++j, ++l) step(off + j, l);
        for (int q = 0; q < Q; ++q) {
          A t = 0;
          for (int l = 0; l < kLanes; ++l) t += acc[q][l];
          part[q * planes + p] = t;
        }
      }
    });
    for (int q = 0; q < Q; ++q) {
      for (int64_t c = 0; c < C; ++c) {
        A t = 0;
        for (int64_t n = 0; n < L.n; ++n) t += part[q * planes + n * C + c];
        sums[q][c] = t;
      }
    }
  } else {
    // NHWC: rows of C channels split into fixed chunks (size from the shape only); each chunk accumulates a
    // [Q, C] partial over its rows (the inner loop over channels is independent per channel, so it
    // vectorises), then the chunks are summed in order.
    const int64_t rows = L.n * L.hw;
    const int64_t chunk = std::max<int64_t>(64, 16384 / std::max<int64_t>(C, 1));
    const int64_t nchunks = (rows + chunk - 1) / chunk;
    std::vector<A> part(Q * nchunks * C, A(0));
    at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        A* pg = part.data() + (Q * k) * C;
        A* pgx = pg + C;
        A* pgr = kHasRes ? pg + 2 * C : nullptr;
        const int64_t m1 = std::min(rows, (k + 1) * chunk);
        for (int64_t m = k * chunk; m < m1; ++m) {
          const int64_t off = m * C;
          for (int64_t c = 0; c < C; ++c) {
            A xf, rf;
            const A g = backward_elem<T, A, kHasRes, kResBN, kRelu>(go, x, r, gx, gr, off + c, s[c], b[c],
                                                                    kResBN ? rs[c] : A(1), kResBN ? rb[c] : A(0),
                                                                    &xf, &rf);
            pg[c] += g;
            pgx[c] += g * (xf - xc[c]);
            if constexpr (kHasRes) pgr[c] += g * (rf - rc[c]);
          }
        }
      }
    });
    for (int q = 0; q < Q; ++q) {
      for (int64_t c = 0; c < C; ++c) {
        A t = 0;
        for (int64_t k = 0; k < nchunks; ++k) t += part[(Q * k + q) * C + c];
        sums[q][c] = t;
      }
    }
  }
}

// Expands the runtime flags into template parameters so the inner loops carry no branches. A residual affine
// without a residual is never instantiated.
template <typename F>
void dispatch_flags(bool has_res, bool res_bn, bool relu, F&& f) {
  const auto with_relu = [&](auto kres, auto kbn) {
    if (relu) f(kres, kbn, std::true_type{});
    else f(kres, kbn, std::false_type{});
  };
  if (!has_res) with_relu(std::false_type{}, std::false_type{});
  else if (res_bn) with_relu(std::true_type{}, std::true_type{});
  else with_relu(std::true_type{}, std::false_type{});
}

// Shared host side of both ops; residual == nullptr is bn_relu.
at::Tensor forward_cpu_impl(const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor* residual, const std::optional<at::Tensor>& res_scale,
                            const std::optional<at::Tensor>& res_shift, bool relu,
                            const std::optional<at::Tensor>& x_centre, const std::optional<at::Tensor>& res_centre) {
  // The centres only matter to the backward; checked here so that a bad one fails at the call that passed it.
  const Layout L = check_inputs(op, x, scale, shift, residual, res_scale, res_shift, nullptr, x_centre, res_centre);
  at::Tensor out = empty_in_layout(x, L);
  if (L.numel == 0) return out;
  const bool has_res = residual != nullptr;
  const bool res_bn = given(res_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_add_relu_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* rp = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    const A* rs = res_bn ? res_scale->const_data_ptr<A>() : nullptr;
    const A* rb = res_bn ? res_shift->const_data_ptr<A>() : nullptr;
    dispatch_flags(has_res, res_bn, relu, [&](auto khas, auto kres, auto krelu) {
      forward_cpu<scalar_t, A, decltype(khas)::value, decltype(kres)::value, decltype(krelu)::value>(
          x.const_data_ptr<scalar_t>(), rp, out.data_ptr<scalar_t>(), scale.const_data_ptr<A>(),
          shift.const_data_ptr<A>(), rs, rb, L);
    });
  });
  return out;
}

BackwardOutputs backward_cpu_impl(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& scale, const at::Tensor& shift, const at::Tensor* residual,
                                  const std::optional<at::Tensor>& res_scale,
                                  const std::optional<at::Tensor>& res_shift, bool relu,
                                  const std::optional<at::Tensor>& x_centre,
                                  const std::optional<at::Tensor>& res_centre) {
  const Layout L =
      check_inputs(op, x, scale, shift, residual, res_scale, res_shift, &grad_out, x_centre, res_centre);
  const bool has_res = residual != nullptr;
  at::Tensor grad_x, grad_r, sum_g, sum_gx, sum_gr;  // named (not structured bindings): lambdas capture them
  std::tie(grad_x, grad_r, sum_g, sum_gx, sum_gr) = empty_backward_outputs(x, scale, L, has_res);
  if (L.numel == 0) return {grad_x, grad_r, sum_g, sum_gx, sum_gr};
  const bool res_bn = given(res_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_add_relu_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* rp = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* grp = has_res ? grad_r.data_ptr<scalar_t>() : nullptr;
    A* sgr = has_res ? sum_gr.data_ptr<A>() : nullptr;
    const A* rs = res_bn ? res_scale->const_data_ptr<A>() : nullptr;
    const A* rb = res_bn ? res_shift->const_data_ptr<A>() : nullptr;
    const A* xc = given(x_centre) ? x_centre->const_data_ptr<A>() : nullptr;
    const A* rc = given(res_centre) ? res_centre->const_data_ptr<A>() : nullptr;
    dispatch_flags(has_res, res_bn, relu, [&](auto khas, auto kres, auto krelu) {
      backward_cpu<scalar_t, A, decltype(khas)::value, decltype(kres)::value, decltype(krelu)::value>(
          grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), rp, grad_x.data_ptr<scalar_t>(), grp,
          scale.const_data_ptr<A>(), shift.const_data_ptr<A>(), rs, rb, xc, rc, sum_g.data_ptr<A>(),
          sum_gx.data_ptr<A>(), sgr, L);
    });
  });
  return {grad_x, grad_r, sum_g, sum_gx, sum_gr};
}

at::Tensor bn_add_relu_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& residual, const std::optional<at::Tensor>& res_scale,
                           const std::optional<at::Tensor>& res_shift, bool relu,
                           const std::optional<at::Tensor>& x_centre, const std::optional<at::Tensor>& res_centre) {
  return forward_cpu_impl("bn_add_relu", x, scale, shift, &residual, res_scale, res_shift, relu, x_centre,
                          res_centre);
}

BackwardOutputs bn_add_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& residual, const std::optional<at::Tensor>& res_scale,
    const std::optional<at::Tensor>& res_shift, bool relu, const std::optional<at::Tensor>& x_centre,
    const std::optional<at::Tensor>& res_centre) {
  return backward_cpu_impl("bn_add_relu_backward", grad_out, x, scale, shift, &residual, res_scale, res_shift,
                           relu, x_centre, res_centre);
}

at::Tensor bn_relu_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                       const std::optional<at::Tensor>& x_centre) {
  return forward_cpu_impl("bn_relu", x, scale, shift, nullptr, std::nullopt, std::nullopt, relu, x_centre,
                          std::nullopt);
}

BackwardOutputsNoRes bn_relu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
                                          const at::Tensor& shift, bool relu,
                                          const std::optional<at::Tensor>& x_centre) {
  const BackwardOutputs o = backward_cpu_impl("bn_relu_backward", grad_out, x, scale, shift, nullptr, std::nullopt,
                                              std::nullopt, relu, x_centre, std::nullopt);
  return {std::get<0>(o), std::get<2>(o), std::get<3>(o)};  // grad_residual and sum_gr are undefined
}

}  // namespace

TORCH_LIBRARY(resnet_fast, m) {
  // Fake (meta) implementations and autograd live in Python; this makes torch import that module when
  // the op is traced before anyone imported it.
  m.set_python_module("resnet_fast.ops.bn_add_relu");
  // x_centre / res_centre are trailing optional arguments (added later), so every older call stays valid.
  m.def("bn_add_relu(Tensor x, Tensor scale, Tensor shift, Tensor residual, Tensor? res_scale=None, "
        "Tensor? res_shift=None, bool relu=True, Tensor? x_centre=None, Tensor? res_centre=None) -> Tensor");
  m.def("bn_add_relu_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, Tensor residual, "
        "Tensor? res_scale, Tensor? res_shift, bool relu, Tensor? x_centre=None, Tensor? res_centre=None) -> "
        "(Tensor grad_x, Tensor grad_residual, Tensor sum_g, Tensor sum_gx, Tensor sum_gr)");
  // The residual-free form (the stem's BN affine + ReLU): the same kernels with kHasRes = false.
  m.def("bn_relu(Tensor x, Tensor scale, Tensor shift, bool relu=True, Tensor? x_centre=None) -> Tensor");
  m.def("bn_relu_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, bool relu, "
        "Tensor? x_centre=None) -> (Tensor grad_x, Tensor sum_g, Tensor sum_gx)");
}

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("bn_add_relu", &bn_add_relu_cpu);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cpu);
  m.impl("bn_relu", &bn_relu_cpu);
  m.impl("bn_relu_backward", &bn_relu_backward_cpu);
}

}  // namespace resnet_fast

// Nothing is exported to Python: the ops are reached through torch.ops.resnet_fast. The module exists so
// that `import resnet_fast._C` (or the JIT-built equivalent) loads the library and runs the registrations.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "resnet_fast C++/CUDA ops (registered in torch.ops.resnet_fast)"; }
