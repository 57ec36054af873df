// CUDA kernels of the residual tail op bn_add_relu and of its residual-free form bn_relu (schemas and semantics:
// bn_add_relu.cpp). One set of kernels serves both: the template parameter kHasRes is false for bn_relu, which
// removes the residual's loads, the grad_residual store and the Σ g·residual sum (the vector path included).
// The backward kernels take the optional per-channel centres xc / rc (nullptr: 0) of the Σ g·(x - xc) and
// Σ g·(residual - rc) sums, loaded per channel like res_scale.
//
// Memory-bound elementwise work, so the kernels aim at full-width memory traffic:
//  * 16-byte vector loads/stores (V = 16 / sizeof(T) elements) when every pointer is 16-byte aligned and the
//    layout allows it; a V = 1 instantiation otherwise. Math in float32 (float64 for float64 tensors).
//  * grid-stride loops, 64-bit element indices (32-bit division where numel < 2^31).
//  * backward reductions: per-thread accumulators -> fixed-order shared-memory tree per block -> one partial per
//    (block, channel) in a [Q, blocks, C] buffer (Q = 3 sums with a residual, 2 without) -> a finalize kernel
//    sums the blocks in order. No atomics, and the grid depends only on the shape, so results are bitwise
//    reproducible.
//  * NHWC: channel = i % C; a block owns a fixed tile of channels (threadIdx.x) and walks rows (threadIdx.y).
//    NCHW: each (n, c) plane is contiguous; a block owns one channel and walks its N planes.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuSPARSE/cuBLAS headers), so the
// file compiles against a CUDA toolkit that has just the runtime.
#include "bn_add_relu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace resnet_fast {
namespace {

constexpr int kThreads = 256;
// Backward grid target (blocks in total). Fixed rather than derived from the SM count so that the reduction
// partition, hence the rounding, is the same on every GPU. 1024 x 256 threads fills an H100 (132 SMs x 2048).
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMaxGridY = 65535;

// Per-channel sums of the backward: Σg, Σg·(x - xc) and, with a residual, Σg·(residual - rc).
template <bool kHasRes>
constexpr int num_sums() { return kHasRes ? 3 : 2; }

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// The residual's vector at p, or zeros without a residual (p is then null and never dereferenced).
template <bool kHasRes, typename T, int V>
__device__ __forceinline__ Vec<T, V> load_res(const T* p) {
  if constexpr (kHasRes) {
    return load_vec<T, V>(p);
  } else {
    Vec<T, V> z;
#pragma unroll
    for (int k = 0; k < V; ++k) z.v[k] = T(0);
    return z;
  }
}

template <bool k32>
__device__ __forceinline__ int64_t mod(int64_t a, int64_t b) {
  return k32 ? static_cast<int64_t>(static_cast<uint32_t>(a) % static_cast<uint32_t>(b)) : a % b;
}

template <bool k32>
__device__ __forceinline__ int64_t div(int64_t a, int64_t b) {
  return k32 ? static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b)) : a / b;
}

// ---------------------------------------------------------------------------------------------------------
// Forward: out = act(x * s[c] + b[c] (+ (res_bn ? r * rs[c] + rb[c] : r) when kHasRes)).
// ---------------------------------------------------------------------------------------------------------
template <typename T, typename A, int V, bool kCL, bool k32, bool kHasRes>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ out, const A* __restrict__ s,
               const A* __restrict__ b, const A* __restrict__ rs, const A* __restrict__ rb, bool res_bn, bool relu,
               int64_t numel, int64_t C, int64_t HW) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = numel / V;
  for (int64_t i = tid; i < nvec; i += stride) {
    const int64_t e0 = i * V;
    // Channel of the first element; the next V-1 follow by increment-with-wrap (no further divisions).
    int64_t c, hw = 0;
    if (kCL) {
      c = mod<k32>(e0, C);
    } else {
      hw = mod<k32>(e0, HW);
      c = mod<k32>(div<k32>(e0, HW), C);
    }
    const Vec<T, V> xv = load_vec<T, V>(x + e0);
    const Vec<T, V> rv = load_res<kHasRes, T, V>(kHasRes ? r + e0 : nullptr);
    Vec<T, V> ov;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A rsc = kHasRes && res_bn ? rs[c] : A(1), rsh = kHasRes && res_bn ? rb[c] : A(0);
      A z = pre_activation<kHasRes>(static_cast<A>(xv.v[k]), static_cast<A>(rv.v[k]), s[c], b[c], rsc, rsh, res_bn);
      if (relu) z = z > A(0) ? z : A(0);
      ov.v[k] = static_cast<T>(z);
      if (kCL) {
        if (++c == C) c = 0;
      } else if (++hw == HW) {
        hw = 0;
        if (++c == C) c = 0;
      }
    }
    store_vec<T, V>(out + e0, ov);
  }
  // Scalar tail (numel % V elements).
  for (int64_t e = nvec * V + tid; e < numel; e += stride) {
    const int64_t c = kCL ? mod<k32>(e, C) : mod<k32>(div<k32>(e, HW), C);
    const A rf = kHasRes ? static_cast<A>(r[e]) : A(0);
    const A rsc = kHasRes && res_bn ? rs[c] : A(1), rsh = kHasRes && res_bn ? rb[c] : A(0);
    A z = pre_activation<kHasRes>(static_cast<A>(x[e]), rf, s[c], b[c], rsc, rsh, res_bn);
    if (relu) z = z > A(0) ? z : A(0);
    out[e] = static_cast<T>(z);
  }
}

// One element of the backward. Returns g (grad_out after the ReLU mask, which is recomputed from the inputs);
// writes *gx and, with a residual, *gr.
template <typename T, typename A, bool kHasRes>
__device__ __forceinline__ A bwd_elem(T go, A xf, A rf, A sc, A sh, A rsc, A rsh, bool res_bn, bool relu, T* gx,
                                      T* gr) {
  A g = static_cast<A>(go);
  if (relu) g = pre_activation<kHasRes>(xf, rf, sc, sh, rsc, rsh, res_bn) > A(0) ? g : A(0);
  *gx = static_cast<T>(g * sc);
  if constexpr (kHasRes) *gr = static_cast<T>(res_bn ? g * rsc : g);
  return g;
}

// ---------------------------------------------------------------------------------------------------------
// Backward, NHWC. Block = TX x TY threads; thread (tx, ty) owns channels c0 .. c0+V-1 of its block's channel
// tile and rows ty, ty + TY, ... of its block's share. Requires C % V == 0.
// partial: [Q, gridDim.x, C], Q = num_sums<kHasRes>(). xc, rc: centres of the sums (nullptr: 0).
// ---------------------------------------------------------------------------------------------------------
template <typename T, typename A, int V, bool kHasRes>
__global__ void __launch_bounds__(kThreads)
    bwd_nhwc_kernel(const T* __restrict__ go, const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ gx,
                    T* __restrict__ gr, const A* __restrict__ s, const A* __restrict__ b, const A* __restrict__ rs,
                    const A* __restrict__ rb, const A* __restrict__ xc, const A* __restrict__ rc, bool res_bn,
                    bool relu, A* __restrict__ partial, int64_t rows, int64_t C) {
  constexpr int Q = num_sums<kHasRes>();
  extern __shared__ unsigned char smem_raw[];
  A* sm = reinterpret_cast<A*>(smem_raw);  // [Q][TY][TX * V]
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int width = TX * V;
  const int64_t nb = gridDim.x;
  for (int64_t tile = blockIdx.y; tile * width < C; tile += gridDim.y) {
    const int64_t c0 = tile * width + static_cast<int64_t>(tx) * V;
    const bool active = c0 < C;
    A sc[V], sh[V], rsc[V], rsh[V], xcen[V], rcen[V], acc[Q][V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      sc[k] = active ? s[c0 + k] : A(0);
      sh[k] = active ? b[c0 + k] : A(0);
      rsc[k] = active && kHasRes && res_bn ? rs[c0 + k] : A(1);
      rsh[k] = active && kHasRes && res_bn ? rb[c0 + k] : A(0);
      xcen[k] = active && xc != nullptr ? xc[c0 + k] : A(0);
      rcen[k] = active && kHasRes && rc != nullptr ? rc[c0 + k] : A(0);
#pragma unroll
      for (int q = 0; q < Q; ++q) acc[q][k] = A(0);
    }
    if (active) {
      for (int64_t m = static_cast<int64_t>(blockIdx.x) * TY + ty; m < rows; m += nb * TY) {
        const int64_t off = m * C + c0;
        const Vec<T, V> gv = load_vec<T, V>(go + off), xv = load_vec<T, V>(x + off);
        const Vec<T, V> rv = load_res<kHasRes, T, V>(kHasRes ? r + off : nullptr);
        Vec<T, V> gxv, grv;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A xf = static_cast<A>(xv.v[k]), rf = static_cast<A>(rv.v[k]);
          const A g = bwd_elem<T, A, kHasRes>(gv.v[k], xf, rf, sc[k], sh[k], rsc[k], rsh[k], res_bn, relu,
                                              &gxv.v[k], &grv.v[k]);
          acc[0][k] += g;
          acc[1][k] += g * (xf - xcen[k]);
          if constexpr (kHasRes) acc[2][k] += g * (rf - rcen[k]);
        }
        store_vec<T, V>(gx + off, gxv);
        if constexpr (kHasRes) store_vec<T, V>(gr + off, grv);
      }
    }
    // Fixed-order tree over ty (TY is a power of two).
    const int plane = TY * width;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int idx = ty * width + tx * V + k;
#pragma unroll
      for (int q = 0; q < Q; ++q) sm[q * plane + idx] = acc[q][k];
    }
    __syncthreads();
    for (int h = TY / 2; h > 0; h >>= 1) {
      if (ty < h) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const int idx = ty * width + tx * V + k, other = (ty + h) * width + tx * V + k;
#pragma unroll
          for (int q = 0; q < Q; ++q) sm[q * plane + idx] += sm[q * plane + other];
        }
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int idx = tx * V + k;
#pragma unroll
        for (int q = 0; q < Q; ++q) partial[(q * nb + blockIdx.x) * C + c0 + k] = sm[q * plane + idx];
      }
    }
    __syncthreads();  // sm is reused by the next tile
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, NCHW. A block owns one channel c (grid-stride over blockIdx.y) and a share of its N * HW elements,
// which sit in N contiguous planes of HW. Requires HW % V == 0. partial: [Q, gridDim.x, C]. xc, rc: as NHWC.
// ---------------------------------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, typename A, int V, bool k32, bool kHasRes>
__global__ void __launch_bounds__(kThreads)
    bwd_nchw_kernel(const T* __restrict__ go, const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ gx,
                    T* __restrict__ gr, const A* __restrict__ s, const A* __restrict__ b, const A* __restrict__ rs,
                    const A* __restrict__ rb, const A* __restrict__ xc, const A* __restrict__ rc, bool res_bn,
                    bool relu, A* __restrict__ partial, int64_t N, int64_t C, int64_t HW) {
  constexpr int Q = num_sums<kHasRes>();
  __shared__ A sm[Q][kThreads / 32];
  const int64_t hwv = HW / V;
  const int64_t per_c = N * hwv;
  const int64_t nb = gridDim.x;
  const int64_t stride = nb * blockDim.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    const A sc = s[c], sh = b[c];
    const A rsc = kHasRes && res_bn ? rs[c] : A(1), rsh = kHasRes && res_bn ? rb[c] : A(0);
    const A xcen = xc != nullptr ? xc[c] : A(0);
    [[maybe_unused]] const A rcen = kHasRes && rc != nullptr ? rc[c] : A(0);
    A acc[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) acc[q] = A(0);
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < per_c; j += stride) {
      const int64_t n = div<k32>(j, hwv);
      const int64_t off = (n * C + c) * HW + (j - n * hwv) * V;
      const Vec<T, V> gv = load_vec<T, V>(go + off), xv = load_vec<T, V>(x + off);
      const Vec<T, V> rv = load_res<kHasRes, T, V>(kHasRes ? r + off : nullptr);
      Vec<T, V> gxv, grv;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A xf = static_cast<A>(xv.v[k]), rf = static_cast<A>(rv.v[k]);
        const A g = bwd_elem<T, A, kHasRes>(gv.v[k], xf, rf, sc, sh, rsc, rsh, res_bn, relu, &gxv.v[k], &grv.v[k]);
        acc[0] += g;
        acc[1] += g * (xf - xcen);
        if constexpr (kHasRes) acc[2] += g * (rf - rcen);
      }
      store_vec<T, V>(gx + off, gxv);
      if constexpr (kHasRes) store_vec<T, V>(gr + off, grv);
    }
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      acc[q] = warp_sum(acc[q]);
      if (lane == 0) sm[q][warp] = acc[q];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        A t = 0;
        for (int w = 0; w < kThreads / 32; ++w) t += sm[q][w];
        partial[(q * nb + blockIdx.x) * C + c] = t;
      }
    }
    __syncthreads();  // sm is reused by the next channel
  }
}

// Sums partial[q, :, c] over the blocks in order: sums[q][c] for q < nq (sum_gr is null when nq == 2).
template <typename A>
__global__ void finalize_kernel(const A* __restrict__ partial, A* __restrict__ sum_g, A* __restrict__ sum_gx,
                                A* __restrict__ sum_gr, int nq, int64_t nb, int64_t C) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nq * C; i += stride) {
    const int64_t q = i / C, c = i - q * C;
    A t = 0;
    for (int64_t k = 0; k < nb; ++k) t += partial[(q * nb + k) * C + c];
    (q == 0 ? sum_g : q == 1 ? sum_gx : sum_gr)[c] = t;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int sm_count(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

template <typename T, typename A, int V, bool kCL, bool kHasRes>
void launch_fwd(const T* x, const T* r, T* out, const A* s, const A* b, const A* rs, const A* rb, bool res_bn,
                bool relu, const Layout& L, int device, cudaStream_t stream) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(L.numel / V + 1, kThreads),
                                                                 static_cast<int64_t>(sm_count(device)) * 8));
  // 32-bit index math is safe when every index (plus one grid stride) stays below 2^31.
  if (L.numel + blocks * kThreads * V < (int64_t(1) << 31)) {
    fwd_kernel<T, A, V, kCL, true, kHasRes><<<blocks, kThreads, 0, stream>>>(x, r, out, s, b, rs, rb, res_bn, relu,
                                                                             L.numel, L.c, L.hw);
  } else {
    fwd_kernel<T, A, V, kCL, false, kHasRes><<<blocks, kThreads, 0, stream>>>(x, r, out, s, b, rs, rb, res_bn,
                                                                              relu, L.numel, L.c, L.hw);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A, int V, bool kHasRes>
void launch_bwd(const T* go, const T* x, const T* r, T* gx, T* gr, const A* s, const A* b, const A* rs, const A* rb,
                const A* xc, const A* rc, bool res_bn, bool relu, A* sum_g, A* sum_gx, A* sum_gr, const Layout& L,
                const at::TensorOptions& acc_opts, cudaStream_t stream) {
  constexpr int Q = num_sums<kHasRes>();
  at::Tensor partial;
  int64_t nb;
  if (L.channels_last) {
    const int64_t rows = L.n * L.hw, cols = L.c / V;
    int tx = 1;
    while (tx < 32 && tx < cols) tx *= 2;
    const int ty = kThreads / tx;
    const int64_t tiles = ceil_div(cols, tx);
    nb = std::max<int64_t>(1, std::min(ceil_div(kTargetBlocks, tiles), ceil_div(rows, ty)));
    partial = at::empty({Q, nb, L.c}, acc_opts);
    const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(std::min(tiles, kMaxGridY)));
    const size_t smem = Q * sizeof(A) * kThreads * V;
    bwd_nhwc_kernel<T, A, V, kHasRes><<<grid, dim3(tx, ty), smem, stream>>>(
        go, x, r, gx, gr, s, b, rs, rb, xc, rc, res_bn, relu, partial.data_ptr<A>(), rows, L.c);
  } else {
    const int64_t per_c = L.n * (L.hw / V);
    nb = std::max<int64_t>(1, std::min(ceil_div(kTargetBlocks, L.c), ceil_div(per_c, kThreads)));
    partial = at::empty({Q, nb, L.c}, acc_opts);
    const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(std::min(L.c, kMaxGridY)));
    if (per_c + nb * kThreads < (int64_t(1) << 31)) {
      bwd_nchw_kernel<T, A, V, true, kHasRes><<<grid, kThreads, 0, stream>>>(
          go, x, r, gx, gr, s, b, rs, rb, xc, rc, res_bn, relu, partial.data_ptr<A>(), L.n, L.c, L.hw);
    } else {
      bwd_nchw_kernel<T, A, V, false, kHasRes><<<grid, kThreads, 0, stream>>>(
          go, x, r, gx, gr, s, b, rs, rb, xc, rc, res_bn, relu, partial.data_ptr<A>(), L.n, L.c, L.hw);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize_kernel<A><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(Q * L.c, kThreads), 1024)), kThreads, 0,
                       stream>>>(partial.data_ptr<A>(), sum_g, sum_gx, sum_gr, Q, nb, L.c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(std::bool_constant<has_res>{}): the runtime "has a residual" as the kernels' template parameter.
template <typename F>
void dispatch_has_res(bool has_res, F&& f) {
  if (has_res) f(std::true_type{});
  else f(std::false_type{});
}

// Shared host side of both ops; residual == nullptr is bn_relu.
at::Tensor forward_cuda_impl(const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             const at::Tensor* residual, const std::optional<at::Tensor>& res_scale,
                             const std::optional<at::Tensor>& res_shift, bool relu,
                             const std::optional<at::Tensor>& x_centre, const std::optional<at::Tensor>& res_centre) {
  // The centres only matter to the backward; checked here so that a bad one fails at the call that passed it.
  const Layout L = check_inputs(op, x, scale, shift, residual, res_scale, res_shift, nullptr, x_centre, res_centre);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = empty_in_layout(x, L);
  if (L.numel == 0) return out;
  const bool has_res = residual != nullptr;
  const bool res_bn = given(res_scale);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_add_relu_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* outp = out.data_ptr<scalar_t>();
    const A* rs = res_bn ? res_scale->const_data_ptr<A>() : nullptr;
    const A* rb = res_bn ? res_shift->const_data_ptr<A>() : nullptr;
    const bool vec = aligned16(xp) && (!has_res || aligned16(rp)) && aligned16(outp);
    const int dev = x.get_device();
    const A* s = scale.const_data_ptr<A>();
    const A* b = shift.const_data_ptr<A>();
    dispatch_has_res(has_res, [&](auto khas) {
      constexpr bool H = decltype(khas)::value;
      if (L.channels_last) {
        if (vec) launch_fwd<scalar_t, A, V, true, H>(xp, rp, outp, s, b, rs, rb, res_bn, relu, L, dev, stream);
        else launch_fwd<scalar_t, A, 1, true, H>(xp, rp, outp, s, b, rs, rb, res_bn, relu, L, dev, stream);
      } else {
        if (vec) launch_fwd<scalar_t, A, V, false, H>(xp, rp, outp, s, b, rs, rb, res_bn, relu, L, dev, stream);
        else launch_fwd<scalar_t, A, 1, false, H>(xp, rp, outp, s, b, rs, rb, res_bn, relu, L, dev, stream);
      }
    });
  });
  return out;
}

BackwardOutputs backward_cuda_impl(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                   const at::Tensor& scale, const at::Tensor& shift, const at::Tensor* residual,
                                   const std::optional<at::Tensor>& res_scale,
                                   const std::optional<at::Tensor>& res_shift, bool relu,
                                   const std::optional<at::Tensor>& x_centre,
                                   const std::optional<at::Tensor>& res_centre) {
  const Layout L =
      check_inputs(op, x, scale, shift, residual, res_scale, res_shift, &grad_out, x_centre, res_centre);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_res = residual != nullptr;
  at::Tensor grad_x, grad_r, sum_g, sum_gx, sum_gr;  // named (not structured bindings): lambdas capture them
  std::tie(grad_x, grad_r, sum_g, sum_gx, sum_gr) = empty_backward_outputs(x, scale, L, has_res);
  if (L.numel == 0) return {grad_x, grad_r, sum_g, sum_gx, sum_gr};
  const bool res_bn = given(res_scale);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_add_relu_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    constexpr int V = 16 / sizeof(scalar_t);
    const scalar_t* gop = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* grp = has_res ? grad_r.data_ptr<scalar_t>() : nullptr;
    A* sgr = has_res ? sum_gr.data_ptr<A>() : nullptr;
    const A* rs = res_bn ? res_scale->const_data_ptr<A>() : nullptr;
    const A* rb = res_bn ? res_shift->const_data_ptr<A>() : nullptr;
    const A* xc = given(x_centre) ? x_centre->const_data_ptr<A>() : nullptr;
    const A* rc = given(res_centre) ? res_centre->const_data_ptr<A>() : nullptr;
    const bool vec = aligned16(gop) && aligned16(xp) && aligned16(gxp) &&
                     (!has_res || (aligned16(rp) && aligned16(grp))) &&
                     (L.channels_last ? L.c % V == 0 : L.hw % V == 0);
    const A* s = scale.const_data_ptr<A>();
    const A* b = shift.const_data_ptr<A>();
    const auto acc_opts = scale.options();
    dispatch_has_res(has_res, [&](auto khas) {
      constexpr bool H = decltype(khas)::value;
      if (vec) {
        launch_bwd<scalar_t, A, V, H>(gop, xp, rp, gxp, grp, s, b, rs, rb, xc, rc, res_bn, relu,
                                      sum_g.data_ptr<A>(), sum_gx.data_ptr<A>(), sgr, L, acc_opts, stream);
      } else {
        launch_bwd<scalar_t, A, 1, H>(gop, xp, rp, gxp, grp, s, b, rs, rb, xc, rc, res_bn, relu,
                                      sum_g.data_ptr<A>(), sum_gx.data_ptr<A>(), sgr, L, acc_opts, stream);
      }
    });
  });
  return {grad_x, grad_r, sum_g, sum_gx, sum_gr};
}

at::Tensor bn_add_relu_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& residual, const std::optional<at::Tensor>& res_scale,
                            const std::optional<at::Tensor>& res_shift, bool relu,
                            const std::optional<at::Tensor>& x_centre, const std::optional<at::Tensor>& res_centre) {
  return forward_cuda_impl("bn_add_relu", x, scale, shift, &residual, res_scale, res_shift, relu, x_centre,
                           res_centre);
}

BackwardOutputs bn_add_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& residual, const std::optional<at::Tensor>& res_scale,
    const std::optional<at::Tensor>& res_shift, bool relu, const std::optional<at::Tensor>& x_centre,
    const std::optional<at::Tensor>& res_centre) {
  return backward_cuda_impl("bn_add_relu_backward", grad_out, x, scale, shift, &residual, res_scale, res_shift,
                            relu, x_centre, res_centre);
}

at::Tensor bn_relu_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                        const std::optional<at::Tensor>& x_centre) {
  return forward_cuda_impl("bn_relu", x, scale, shift, nullptr, std::nullopt, std::nullopt, relu, x_centre,
                           std::nullopt);
}

BackwardOutputsNoRes bn_relu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
                                           const at::Tensor& shift, bool relu,
                                           const std::optional<at::Tensor>& x_centre) {
  const BackwardOutputs o = backward_cuda_impl("bn_relu_backward", grad_out, x, scale, shift, nullptr, std::nullopt,
                                               std::nullopt, relu, x_centre, std::nullopt);
  return {std::get<0>(o), std::get<2>(o), std::get<3>(o)};  // grad_residual and sum_gr are undefined
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CUDA, m) {
  m.impl("bn_add_relu", &bn_add_relu_cuda);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cuda);
  m.impl("bn_relu", &bn_relu_cuda);
  m.impl("bn_relu_backward", &bn_relu_backward_cuda);
}

}  // namespace resnet_fast
