// Context-Prediction Fusion (docs/method.md §5.2), CUDA kernels. Math and the returned kept
// set are those of fusion_cpu.cpp (read its header first); this file only differs in how the
// top-p set is found without sorting V probabilities per row:
//
//   kept = { j : F(s_j) <= top_p },  F(t) = sum_{i : s_i >= t} p_i      (top-1 always kept)
//
// F is monotone in the scaled logit s, so the boundary is a radix select over the
// order-preserving 32-bit keys of s: 4 passes over the row, each building a 256-bucket histogram
// of probability mass (shared-memory atomics) under the prefix fixed so far. Tokens tied exactly
// at the boundary are kept or cut together (the reference's torch.sort leaves their order
// unspecified); ties for the top-1 go to the lowest token id, as on CPU.
//
// The boundary sums run in double (shared-memory double atomics: sm_60+).
//
// Kernels, one launch each:
//   select   (1 block / row): max, softmax normaliser, radix threshold, kept count
//   compact  (1 block / row): kept ids + weights in id order (block scan, deterministic)
//   gather   (row x d-tiles): out = alpha h + (1 - alpha) sum_j w_j E[id_j]   (fp32 accumulation)
//   dot      (row x kept-tiles, 1 warp / kept token): u_j = (1 - alpha) <g, E[id_j]>
//   logit    (1 block / row): dL/dlogit_j = w_j (u_j - sum_k w_k u_k) / T
//   embed    (kept entry x d-tiles): fp32 atomics into one buffer row per *distinct* kept id
//            (a row repeated across the batch accumulates there), then cast + index_copy into
//            the dense V' x d gradient.
// The host reads K_max (one device sync) to size the kept-set tensors.
//
// fp32 / bf16 / fp16 inputs, fp32 math throughout. Slim includes (no <torch/extension.h>, no
// ATen/cuda/CUDAContext.h): nothing here needs cuBLAS/cuSPARSE headers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_unique2.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <tuple>

namespace ltscale {

using at::Tensor;

// Defined in fusion_cpu.cpp (shapes, dtypes agree, alpha/temperature/top_p/exclude ranges).
void check_forward_args(const Tensor& hidden, const Tensor& logits, const Tensor& weight, double alpha,
                        double temperature, double top_p, int64_t exclude_token_id);

namespace {

constexpr int kRowThreads = 512;  // select / compact / logit kernels: one block per row
constexpr int kTileThreads = 256;  // gather / dot / embed kernels
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kMaxGridY = 65535;

#define LTSCALE_CUDA_DISPATCH(TYPE, ...)                                                             \
  switch (TYPE) {                                                                                   \
    case at::kFloat: {                                                                              \
      using scalar_t = float;                                                                       \
      __VA_ARGS__();                                                                                \
      break;                                                                                        \
    }                                                                                               \
    case at::kHalf: {                                                                               \
      using scalar_t = at::Half;                                                                    \
      __VA_ARGS__();                                                                                \
      break;                                                                                        \
    }                                                                                               \
    case at::kBFloat16: {                                                                           \
      using scalar_t = at::BFloat16;                                                                \
      __VA_ARGS__();                                                                                \
      break;                                                                                        \
    }                                                                                               \
    default:                                                                                        \
      TORCH_CHECK(false, "ltscale::context_prediction_fusion (CUDA kernel): float32, bfloat16 or " \
                  "float16 only, got ", TYPE, "; use impl='torch' for other dtypes");             \
  }

__device__ __forceinline__ uint32_t order_key(float f) {
  // Monotone map float -> uint32 (larger float, larger key).
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Every thread gets the block total, summed in the same order (so all agree bit for bit).
template <int NT, typename T>
__device__ T block_sum(T v, T* sh) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  T t = 0;
  for (int k = 0; k < NT / 32; ++k) t += sh[k];
  return t;
}

__device__ __forceinline__ void better(float& v, int64_t& i, float v2, int64_t i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

template <int NT>
__device__ void block_argmax(float& v, int64_t& i, float* shv, int64_t* shi) {
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(kFull, v, o);
    const int64_t i2 = __shfl_xor_sync(kFull, i, o);
    better(v, i, v2, i2);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    shv[warp] = v;
    shi[warp] = i;
  }
  __syncthreads();
  v = shv[0];
  i = shi[0];
  for (int k = 1; k < NT / 32; ++k) better(v, i, shv[k], shi[k]);
}

// Exclusive prefix count of `flag` over the block (thread order), plus the block total.
template <int NT>
__device__ int block_exclusive_scan(bool flag, int* sh, int& total) {
  const unsigned ballot = __ballot_sync(kFull, flag);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  __syncthreads();
  if (lane == 0) sh[warp] = __popc(ballot);
  __syncthreads();
  int off = 0;
  total = 0;
  for (int k = 0; k < NT / 32; ++k) {
    const int c = sh[k];
    if (k < warp) off += c;
    total += c;
  }
  return off + in_warp;
}

// Per row: max scaled logit M and its id, normaliser Z, the kept-set key threshold `lo`
// (kept = { j != excl : key(s_j) >= lo }; -1 = top-1 only) and the kept count.
template <typename scalar_t, int NT>
__global__ void __launch_bounds__(NT)
    select_kernel(const scalar_t* __restrict__ logits, int64_t V, int64_t excl, float temperature, double top_p,
                  bool keep_all, float* __restrict__ row_max, float* __restrict__ row_z, int64_t* __restrict__ row_lo,
                  int64_t* __restrict__ row_count, int64_t* __restrict__ row_top) {
  __shared__ float shf[NT / 32];
  __shared__ double shd[NT / 32];
  __shared__ int64_t shi[NT / 32];
  __shared__ double hist[256];
  __shared__ uint32_t s_prefix, s_mask;
  __shared__ double s_above;
  __shared__ int s_done;
  const int64_t row = blockIdx.x;
  const scalar_t* l = logits + row * V;

  float best = -INFINITY;
  int64_t best_id = LLONG_MAX;
  for (int64_t j = threadIdx.x; j < V; j += NT) {
    if (j != excl) better(best, best_id, static_cast<float>(l[j]) / temperature, j);
  }
  block_argmax<NT>(best, best_id, shf, shi);
  const float M = best;
  // The kept-set boundary is decided in double (normaliser, histogram, running sum): fp32 sums
  // over ~1e5 tokens drift by ~1e-7, enough to move the boundary of a flat row by a token.
  double z = 0.0;
  for (int64_t j = threadIdx.x; j < V; j += NT) {
    if (j != excl) z += static_cast<double>(expf(static_cast<float>(l[j]) / temperature - M));
  }
  const double Z = block_sum<NT>(z, shd);

  uint64_t lo = 0;  // keep_all (top_p >= 1): every non-excluded token
  if (!keep_all) {
    uint32_t prefix = 0, mask = 0;
    double above = 0.0;  // mass of tokens whose key is above the current prefix region
    bool done = false;
    for (int shift = 24; shift >= 0 && !done; shift -= 8) {
      for (int b = threadIdx.x; b < 256; b += NT) hist[b] = 0.0;
      __syncthreads();
      for (int64_t j = threadIdx.x; j < V; j += NT) {
        if (j == excl) continue;
        const float s = static_cast<float>(l[j]) / temperature;
        const uint32_t key = order_key(s);
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], static_cast<double>(expf(s - M)) / Z);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        // The crossing bucket: the highest c with above + mass(buckets >= c) > top_p. Buckets
        // above it are kept, below it cut; recurse into it. None: the whole region is kept.
        double cum = above;
        int crossed = -1;
        for (int c = 255; c >= 0; --c) {
          const double next = cum + hist[c];
          if (next > top_p) {
            crossed = c;
            break;
          }
          cum = next;
        }
        s_done = crossed < 0;
        if (crossed >= 0) {
          s_above = cum;
          s_prefix = prefix | (static_cast<uint32_t>(crossed) << shift);
          s_mask = mask | (255u << shift);
        }
      }
      __syncthreads();
      if (s_done) {
        done = true;
      } else {
        above = s_above;
        prefix = s_prefix;
        mask = s_mask;
      }
    }
    // done: keys >= the region's lowest key; else the exact crossing key is cut: keys above it.
    lo = done ? static_cast<uint64_t>(prefix) : static_cast<uint64_t>(prefix) + 1;
  }
  int64_t cnt = 0;
  for (int64_t j = threadIdx.x; j < V; j += NT) {
    if (j != excl && static_cast<uint64_t>(order_key(static_cast<float>(l[j]) / temperature)) >= lo) ++cnt;
  }
  cnt = block_sum<NT>(cnt, shi);
  if (threadIdx.x == 0) {
    row_max[row] = M;
    row_z[row] = static_cast<float>(Z);  // weights are renormalised over the kept set: fp32 is enough
    row_lo[row] = cnt > 0 ? static_cast<int64_t>(lo) : -1;
    row_count[row] = cnt > 0 ? cnt : 1;
    row_top[row] = best_id;
  }
}

// Kept ids (ascending) and renormalised weights into row `row` of the (N, K) outputs; padding
// repeats the first id with weight 0.
template <typename scalar_t, int NT>
__global__ void __launch_bounds__(NT)
    compact_kernel(const scalar_t* __restrict__ logits, int64_t V, int64_t excl, float temperature,
                   const float* __restrict__ row_max, const float* __restrict__ row_z,
                   const int64_t* __restrict__ row_lo, const int64_t* __restrict__ row_count,
                   const int64_t* __restrict__ row_top, int64_t K, int64_t* __restrict__ idx, float* __restrict__ w) {
  __shared__ int shc[NT / 32];
  __shared__ float shf[NT / 32];
  const int64_t row = blockIdx.x;
  const scalar_t* l = logits + row * V;
  int64_t* ir = idx + row * K;
  float* wr = w + row * K;
  const int64_t lo = row_lo[row];
  if (lo < 0) {  // the top-1 token alone exceeds top_p
    const int64_t top = row_top[row];
    for (int64_t i = threadIdx.x; i < K; i += NT) {
      ir[i] = top;
      wr[i] = i == 0 ? 1.f : 0.f;
    }
    return;
  }
  const float M = row_max[row], Z = row_z[row];
  const int64_t cnt = row_count[row];
  float part = 0.f;
  int64_t base = 0;
  for (int64_t tile = 0; tile < V; tile += NT) {
    const int64_t j = tile + threadIdx.x;
    bool flag = false;
    float p = 0.f;
    if (j < V && j != excl) {
      const float s = static_cast<float>(l[j]) / temperature;
      if (static_cast<uint64_t>(order_key(s)) >= static_cast<uint64_t>(lo)) {
        flag = true;
        p = expf(s - M) / Z;
      }
    }
    int total = 0;
    const int pos = block_exclusive_scan<NT>(flag, shc, total);
    if (flag && base + pos < K) {
      ir[base + pos] = j;
      wr[base + pos] = p;
      part += p;
    }
    base += total;
  }
  const float S = block_sum<NT>(part, shf);  // its __syncthreads also publishes the writes above
  for (int64_t i = threadIdx.x; i < cnt; i += NT) wr[i] = wr[i] / S;
  const int64_t first = ir[0];
  for (int64_t i = cnt + threadIdx.x; i < K; i += NT) {
    ir[i] = first;
    wr[i] = 0.f;
  }
}

template <typename scalar_t, int NT>
__global__ void __launch_bounds__(NT)
    gather_kernel(const scalar_t* __restrict__ hidden, const scalar_t* __restrict__ E, const int64_t* __restrict__ idx,
                  const float* __restrict__ w, int64_t d, int64_t K, float alpha, scalar_t* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const int64_t* ir = idx + row * K;
  const float* wr = w + row * K;
  for (int64_t col = blockIdx.y * static_cast<int64_t>(NT) + threadIdx.x; col < d;
       col += static_cast<int64_t>(gridDim.y) * NT) {
    float acc = 0.f;
#pragma unroll 4
    for (int64_t j = 0; j < K; ++j) {
      const float wj = wr[j];
      if (wj != 0.f) acc += wj * static_cast<float>(E[ir[j] * d + col]);
    }
    out[row * d + col] = static_cast<scalar_t>(alpha * static_cast<float>(hidden[row * d + col]) + (1.f - alpha) * acc);
  }
}

template <typename scalar_t>
__global__ void dot_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ E,
                           const int64_t* __restrict__ idx, const float* __restrict__ w, int64_t d, int64_t K,
                           float one_minus_alpha, float* __restrict__ u) {
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x;
  const scalar_t* gr = g + row * d;
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * warps + (threadIdx.x >> 5); j < K;
       j += static_cast<int64_t>(gridDim.y) * warps) {
    const float wj = w[row * K + j];  // warp-uniform
    float dot = 0.f;
    if (wj != 0.f) {
      const scalar_t* er = E + idx[row * K + j] * d;
      for (int64_t c = lane; c < d; c += 32) dot += static_cast<float>(gr[c]) * static_cast<float>(er[c]);
      dot = warp_sum(dot);
    }
    if (lane == 0) u[row * K + j] = one_minus_alpha * dot;
  }
}

template <typename scalar_t, int NT>
__global__ void __launch_bounds__(NT)
    logit_grad_kernel(const int64_t* __restrict__ idx, const float* __restrict__ w, const float* __restrict__ u,
                      int64_t K, int64_t V, float temperature, scalar_t* __restrict__ grad_logits) {
  __shared__ float shf[NT / 32];
  const int64_t row = blockIdx.x;
  float part = 0.f;
  for (int64_t j = threadIdx.x; j < K; j += NT) part += w[row * K + j] * u[row * K + j];
  const float ubar = block_sum<NT>(part, shf);
  for (int64_t j = threadIdx.x; j < K; j += NT) {
    const float wj = w[row * K + j];
    // kept ids are distinct within a row: plain stores
    if (wj != 0.f) grad_logits[row * V + idx[row * K + j]] = static_cast<scalar_t>(wj * (u[row * K + j] - ubar) / temperature);
  }
}

template <typename scalar_t, int NT>
__global__ void __launch_bounds__(NT)
    embed_grad_kernel(const scalar_t* __restrict__ g, const int64_t* __restrict__ inverse,
                      const float* __restrict__ w, int64_t d, int64_t K, float one_minus_alpha,
                      float* __restrict__ buf) {
  const int64_t e = blockIdx.x;  // flat (row, j) entry
  const float wj = w[e];
  if (wj == 0.f) return;
  const float coef = one_minus_alpha * wj;
  const scalar_t* gr = g + (e / K) * d;
  float* dst = buf + inverse[e] * d;
  for (int64_t col = blockIdx.y * static_cast<int64_t>(NT) + threadIdx.x; col < d;
       col += static_cast<int64_t>(gridDim.y) * NT) {
    atomicAdd(dst + col, coef * static_cast<float>(gr[col]));
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::tuple<Tensor, Tensor, Tensor> forward_cuda(const Tensor& hidden, const Tensor& logits, const Tensor& weight,
                                                double alpha, double temperature, double top_p,
                                                int64_t exclude_token_id) {
  check_forward_args(hidden, logits, weight, alpha, temperature, top_p, exclude_token_id);
  c10::cuda::CUDAGuard guard(hidden.device());
  const Tensor h = hidden.contiguous(), l = logits.contiguous(), e = weight.contiguous();
  const int64_t N = l.size(0), V = l.size(1), d = h.size(1);
  const auto fopt = h.options().dtype(at::kFloat);
  const auto lopt = h.options().dtype(at::kLong);
  Tensor out = at::empty({N, d}, h.options());
  if (N == 0) return {out, at::empty({0, 1}, lopt), at::empty({0, 1}, fopt)};
  Tensor row_max = at::empty({N}, fopt), row_z = at::empty({N}, fopt);
  Tensor row_lo = at::empty({N}, lopt), row_count = at::empty({N}, lopt), row_top = at::empty({N}, lopt);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float T = static_cast<float>(temperature);
  Tensor idx, w;
  LTSCALE_CUDA_DISPATCH(h.scalar_type(), [&] {
    select_kernel<scalar_t, kRowThreads><<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(
        l.const_data_ptr<scalar_t>(), V, exclude_token_id, T, top_p, top_p >= 1.0,
        row_max.mutable_data_ptr<float>(), row_z.mutable_data_ptr<float>(), row_lo.mutable_data_ptr<int64_t>(),
        row_count.mutable_data_ptr<int64_t>(), row_top.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t K = row_count.max().item<int64_t>();  // one sync: sizes the kept-set tensors
    idx = at::empty({N, K}, lopt);
    w = at::empty({N, K}, fopt);
    compact_kernel<scalar_t, kRowThreads><<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(
        l.const_data_ptr<scalar_t>(), V, exclude_token_id, T, row_max.const_data_ptr<float>(),
        row_z.const_data_ptr<float>(), row_lo.const_data_ptr<int64_t>(), row_count.const_data_ptr<int64_t>(),
        row_top.const_data_ptr<int64_t>(), K, idx.mutable_data_ptr<int64_t>(), w.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (d > 0) {
      const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(std::min(ceil_div(d, kTileThreads), kMaxGridY)));
      gather_kernel<scalar_t, kTileThreads><<<grid, kTileThreads, 0, stream>>>(
          h.const_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
          w.const_data_ptr<float>(), d, K, static_cast<float>(alpha), out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, idx, w};
}

std::tuple<Tensor, Tensor, Tensor> backward_cuda(const Tensor& grad_out, const Tensor& weight, const Tensor& idx,
                                                 const Tensor& w, double alpha, double temperature, int64_t vocab,
                                                 std::array<bool, 3> mask) {
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type() && w.scalar_type() == at::kFloat,
              "ltscale::context_prediction_fusion_backward (CUDA): dtype mismatch");
  TORCH_CHECK(idx.dim() == 2 && w.sizes() == idx.sizes() && idx.size(0) == grad_out.size(0),
              "ltscale::context_prediction_fusion_backward: idx/w do not match grad_out");
  c10::cuda::CUDAGuard guard(grad_out.device());
  const Tensor g = grad_out.contiguous(), e = weight.contiguous(), ids = idx.contiguous(), ww = w.contiguous();
  const int64_t N = g.size(0), d = g.size(1), K = ids.size(1);
  const float b = static_cast<float>(1.0 - alpha);
  auto stream = c10::cuda::getCurrentCUDAStream();
  Tensor gh = mask[0] ? g.mul(alpha) : at::empty({0}, g.options());
  Tensor gl = mask[1] ? at::zeros({N, vocab}, g.options()) : at::empty({0}, g.options());
  Tensor ge = mask[2] ? at::zeros(e.sizes(), e.options()) : at::empty({0}, e.options());
  if (N == 0 || K == 0 || d == 0) return {gh, gl, ge};
  LTSCALE_CUDA_DISPATCH(g.scalar_type(), [&] {
    if (mask[1]) {
      Tensor u = at::empty({N, K}, g.options().dtype(at::kFloat));
      const int warps = kTileThreads / 32;
      const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(std::min(ceil_div(K, warps), kMaxGridY)));
      dot_kernel<scalar_t><<<grid, kTileThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>(), ids.const_data_ptr<int64_t>(),
          ww.const_data_ptr<float>(), d, K, b, u.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      logit_grad_kernel<scalar_t, kRowThreads><<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(
          ids.const_data_ptr<int64_t>(), ww.const_data_ptr<float>(), u.const_data_ptr<float>(), K, vocab,
          static_cast<float>(temperature), gl.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (mask[2]) {
      // One fp32 accumulator row per distinct kept id, then one cast + scatter into the dense grad.
      auto uniq = at::_unique2(ids.view({-1}), /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/false);
      const Tensor& rows = std::get<0>(uniq);
      const Tensor inverse = std::get<1>(uniq).contiguous();
      Tensor buf = at::zeros({rows.size(0), d}, g.options().dtype(at::kFloat));
      const dim3 grid(static_cast<unsigned>(N * K),
                      static_cast<unsigned>(std::min(ceil_div(d, kTileThreads), kMaxGridY)));
      embed_grad_kernel<scalar_t, kTileThreads><<<grid, kTileThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), inverse.const_data_ptr<int64_t>(), ww.const_data_ptr<float>(), d, K, b,
          buf.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ge.index_copy_(0, rows, buf.to(e.scalar_type()));
    }
  });
  return {gh, gl, ge};
}

}  // namespace

TORCH_LIBRARY_IMPL(ltscale, CUDA, m) {
  m.impl("context_prediction_fusion_forward", &forward_cuda);
  m.impl("context_prediction_fusion_backward", &backward_cuda);
}

}  // namespace ltscale
