// Context-Prediction Fusion (docs/method.md §5.2), C++ CPU kernel + op registration.
//
//   e = alpha * h + (1 - alpha) * sum_{w in kept} P-hat(w) * E[w]
//
// P = softmax(logits / T) with the excluded (<thinking>) token at probability 0; kept = the
// descending-probability prefix whose cumulative sum is <= top_p (the crossing token is cut, the
// top-1 token is always kept; top_p >= 1 keeps every token); P-hat = P renormalised over kept.
//
// Why a kernel: the torch reference computes a dense (N x V) @ (V x d) product and, backward, a
// dense V x d gradient product; after top-p only K << V rows of E carry weight. This kernel reads
// the N x V logits, selects the kept set without a full sort (nth_element on growing prefixes),
// and touches only the kept rows of E forward and backward.
//
// Backward, with g = dL/de, u_j = (1 - alpha) <g, E[j]>, u_bar = sum_j P-hat_j u_j:
//   dL/dh = alpha * g
//   dL/dE[j] += (1 - alpha) * P-hat_j * g                  (rows repeat across the batch: summed)
//   dL/dlogit_j = P-hat_j * (u_j - u_bar) / T  for kept j, 0 otherwise
// (the renormalisation makes the softmax's shift term vanish for cut tokens, so their gradient
// is exactly 0; the reference's autograd gives 0 up to round-off).
//
// When the kept sets cover more than a quarter of the N x V weights (a flat distribution, top_p = 1)
// the gather and its backward switch to dense GEMMs (the reference's own computation), which beat
// row-by-row access there; the selection and the returned kept set are the same.
//
// The forward returns, besides the output, the kept set as a padded (N, K_max) index tensor and
// the matching weights (padding: index of the row's first kept token, weight 0). Backward uses
// only those plus E, so it never re-selects.
//
// Slim ATen includes instead of <torch/extension.h>: ~3x faster to compile (docs/GPU.md,
// "Compiling the CUDA kernel without a GPU"). The Python module is a bare C-API module: importing it
// runs the static TORCH_LIBRARY registrations below.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#define LTSCALE_STR_(x) #x
#define LTSCALE_STR(x) LTSCALE_STR_(x)

namespace ltscale {

using at::Tensor;

// Shared argument checks (the CUDA file has its own copy of the device/dtype part).
void check_forward_args(const Tensor& hidden, const Tensor& logits, const Tensor& weight, double alpha,
                        double temperature, double top_p, int64_t exclude_token_id) {
  TORCH_CHECK(hidden.dim() == 2 && logits.dim() == 2 && weight.dim() == 2,
              "ltscale::context_prediction_fusion: expected hidden (N, d), logits (N, V), weight (V', d); got ",
              hidden.sizes(), ", ", logits.sizes(), ", ", weight.sizes());
  TORCH_CHECK(hidden.size(0) == logits.size(0), "ltscale::context_prediction_fusion: hidden ", hidden.sizes(),
              " and logits ", logits.sizes(), " disagree on N");
  TORCH_CHECK(weight.size(0) >= logits.size(1) && weight.size(1) == hidden.size(1),
              "ltscale::context_prediction_fusion: weight ", weight.sizes(), " does not fit logits ", logits.sizes(),
              " / hidden ", hidden.sizes());
  TORCH_CHECK(hidden.scalar_type() == logits.scalar_type() && hidden.scalar_type() == weight.scalar_type(),
              "ltscale::context_prediction_fusion: hidden, logits and weight must share a dtype, got ",
              hidden.scalar_type(), ", ", logits.scalar_type(), ", ", weight.scalar_type());
  TORCH_CHECK(hidden.device() == logits.device() && hidden.device() == weight.device(),
              "ltscale::context_prediction_fusion: tensors on different devices");
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, "ltscale::context_prediction_fusion: alpha=", alpha, " outside [0, 1]");
  TORCH_CHECK(temperature > 0.0, "ltscale::context_prediction_fusion: temperature=", temperature, " must be > 0");
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "ltscale::context_prediction_fusion: top_p=", top_p, " outside (0, 1]");
  TORCH_CHECK(exclude_token_id >= -1 && exclude_token_id < logits.size(1),
              "ltscale::context_prediction_fusion: exclude_token_id=", exclude_token_id, " outside [-1, V=",
              logits.size(1), ")");
  TORCH_CHECK(logits.size(1) > (exclude_token_id >= 0 ? 1 : 0),
              "ltscale::context_prediction_fusion: no token left after excluding ", exclude_token_id);
}

namespace {

// One row's kept set: indices in descending-probability order (index order when top_p >= 1)
// and their renormalised weights.
template <typename scalar_t>
struct KeptRow {
  std::vector<int64_t> idx;
  std::vector<scalar_t> w;
};

template <typename scalar_t>
void select_row(const scalar_t* l, int64_t V, int64_t excl, scalar_t temperature, double top_p,
                std::vector<scalar_t>& p, std::vector<int64_t>& cand, KeptRow<scalar_t>& out) {
  // Temperature softmax with the excluded token at probability 0.
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t j = 0; j < V; ++j) {
    if (j != excl) m = std::max(m, l[j] / temperature);
  }
  double z = 0.0;
  for (int64_t j = 0; j < V; ++j) {
    const scalar_t e = j == excl ? scalar_t(0) : std::exp(l[j] / temperature - m);
    p[j] = e;
    z += e;
  }
  const scalar_t zs = static_cast<scalar_t>(z);
  for (int64_t j = 0; j < V; ++j) p[j] /= zs;

  cand.clear();
  for (int64_t j = 0; j < V; ++j) {
    if (j != excl) cand.push_back(j);
  }
  const int64_t n = static_cast<int64_t>(cand.size());
  int64_t kept = n;
  if (top_p < 1.0) {
    // Descending probability, ties by index (torch.sort leaves tie order unspecified).
    auto cmp = [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); };
    // Same arithmetic as the reference: the CPU cumsum accumulates fp32 in double, rounds to the
    // tensor dtype, and compares with top_p cast to that dtype.
    const scalar_t limit = static_cast<scalar_t>(top_p);
    double cum = 0.0;
    int64_t begin = 0, chunk = 64;
    kept = -1;
    while (kept < 0) {
      const int64_t end = std::min(n, begin + chunk);
      if (end < n) std::nth_element(cand.begin() + begin, cand.begin() + end, cand.end(), cmp);
      std::sort(cand.begin() + begin, cand.begin() + end, cmp);
      for (int64_t i = begin; i < end; ++i) {
        cum += p[cand[i]];
        if (i > 0 && static_cast<scalar_t>(cum) > limit) {
          kept = i;
          break;
        }
      }
      if (kept < 0 && end == n) kept = n;
      begin = end;
      chunk *= 4;
    }
  }
  double s = 0.0;
  for (int64_t i = 0; i < kept; ++i) s += p[cand[i]];
  const scalar_t ss = static_cast<scalar_t>(s);
  out.idx.assign(cand.begin(), cand.begin() + kept);
  out.w.resize(kept);
  for (int64_t i = 0; i < kept; ++i) out.w[i] = p[cand[i]] / ss;
}

// Dense mode: when the kept sets cover more than a quarter of the N x V weights, BLAS on the
// dense weight matrix (the reference's computation) is faster than gathering rows one by one.
bool use_dense(int64_t kept_entries, int64_t N, int64_t V) { return 4 * kept_entries > N * V; }

template <typename scalar_t>
Tensor dense_weights(const std::vector<KeptRow<scalar_t>>& rows, int64_t N, int64_t V, const at::TensorOptions& opt) {
  Tensor W = at::zeros({N, V}, opt);
  scalar_t* wp = W.mutable_data_ptr<scalar_t>();
  for (int64_t r = 0; r < N; ++r) {
    for (size_t i = 0; i < rows[r].idx.size(); ++i) wp[r * V + rows[r].idx[i]] = rows[r].w[i];
  }
  return W;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> forward_cpu_impl(const Tensor& hidden, const Tensor& logits, const Tensor& weight,
                                                    double alpha, double temperature, double top_p, int64_t excl) {
  const int64_t N = logits.size(0), V = logits.size(1), d = hidden.size(1);
  const scalar_t* hp = hidden.const_data_ptr<scalar_t>();
  const scalar_t* lp = logits.const_data_ptr<scalar_t>();
  const scalar_t* ep = weight.const_data_ptr<scalar_t>();
  Tensor out = at::empty({N, d}, hidden.options());
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const scalar_t a = static_cast<scalar_t>(alpha), b = static_cast<scalar_t>(1.0 - alpha);
  const scalar_t T = static_cast<scalar_t>(temperature);

  std::vector<KeptRow<scalar_t>> rows(N);
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    std::vector<scalar_t> p(V);
    std::vector<int64_t> cand;
    cand.reserve(V);
    for (int64_t r = r0; r < r1; ++r) select_row<scalar_t>(lp + r * V, V, excl, T, top_p, p, cand, rows[r]);
  });
  int64_t total = 0;
  for (const auto& kr : rows) total += static_cast<int64_t>(kr.idx.size());

  if (use_dense(total, N, V)) {
    // Most of V kept (a flat distribution, or top_p = 1): one GEMM beats K scattered row reads.
    const Tensor W = dense_weights<scalar_t>(rows, N, V, logits.options());
    out = at::addmm(hidden, W, weight.narrow(0, 0, V), alpha, 1.0 - alpha);
  } else {
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> acc(d);
      for (int64_t r = r0; r < r1; ++r) {
        const KeptRow<scalar_t>& kr = rows[r];
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (size_t i = 0; i < kr.idx.size(); ++i) {
          const scalar_t wi = kr.w[i];
          const scalar_t* er = ep + kr.idx[i] * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += wi * er[c];
        }
        const scalar_t* hr = hp + r * d;
        scalar_t* orow = op + r * d;
        for (int64_t c = 0; c < d; ++c) orow[c] = a * hr[c] + b * acc[c];
      }
    });
  }

  int64_t kmax = 1;
  for (const auto& kr : rows) kmax = std::max<int64_t>(kmax, static_cast<int64_t>(kr.idx.size()));
  Tensor idx = at::empty({N, kmax}, logits.options().dtype(at::kLong));
  Tensor w = at::zeros({N, kmax}, logits.options());
  int64_t* ip = idx.mutable_data_ptr<int64_t>();
  scalar_t* wp = w.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto& kr = rows[r];
      const int64_t k = static_cast<int64_t>(kr.idx.size());
      std::copy(kr.idx.begin(), kr.idx.end(), ip + r * kmax);
      std::fill(ip + r * kmax + k, ip + (r + 1) * kmax, kr.idx[0]);  // padding: weight 0
      std::copy(kr.w.begin(), kr.w.end(), wp + r * kmax);
    }
  });
  return {out, idx, w};
}

// A zero tensor whose untouched pages are never written: large calloc blocks come straight from
// mmap as shared zero pages, so only the kept rows of the V' x d embedding gradient are paged in
// (at::zeros would write all of it: at V=128k, d=4096 fp32 that is 2 GiB per call).
Tensor lazy_zeros(at::IntArrayRef sizes, const at::TensorOptions& options, size_t elem_size) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  if (numel * static_cast<int64_t>(elem_size) < (int64_t{1} << 22)) return at::zeros(sizes, options);
  void* data = std::calloc(static_cast<size_t>(numel), elem_size);
  TORCH_CHECK(data != nullptr, "ltscale::context_prediction_fusion_backward: out of memory allocating ", sizes);
  return at::from_blob(data, sizes, [](void* ptr) { std::free(ptr); }, options);
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> backward_cpu_impl(const Tensor& g, const Tensor& weight, const Tensor& idx,
                                                     const Tensor& w, double alpha, double temperature, int64_t V,
                                                     std::array<bool, 3> mask) {
  const int64_t N = g.size(0), d = g.size(1), K = idx.size(1);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* ep = weight.const_data_ptr<scalar_t>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const scalar_t a = static_cast<scalar_t>(alpha), b = static_cast<scalar_t>(1.0 - alpha);
  const scalar_t T = static_cast<scalar_t>(temperature);
  Tensor gh, gl, ge;

  if (mask[0]) {
    gh = at::empty({N, d}, g.options());
    scalar_t* o = gh.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * d, 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = a * gp[i];
    });
  }
  int64_t nnz = 0;
  for (int64_t i = 0; i < N * K; ++i) nnz += wp[i] != scalar_t(0);
  const bool dense = use_dense(nnz, N, V) && (mask[1] || mask[2]);
  Tensor W, gb, U;  // dense mode: weights N x V, (1 - alpha) g, and u for every token
  if (dense) {
    W = at::zeros({N, V}, g.options());
    scalar_t* o = W.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < N * K; ++i) {
      if (wp[i] != scalar_t(0)) o[(i / K) * V + ip[i]] = wp[i];
    }
    gb = g.mul(1.0 - alpha);
    if (mask[1]) U = at::mm(gb, weight.narrow(0, 0, V).t()).contiguous();
  }
  if (mask[1]) {
    gl = at::zeros({N, V}, g.options());
    scalar_t* o = gl.mutable_data_ptr<scalar_t>();
    const scalar_t* up = dense ? U.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> u(K);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* gr = gp + r * d;
        scalar_t ubar = 0;
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t wj = wp[r * K + j];
          if (wj == scalar_t(0)) {
            u[j] = 0;
            continue;
          }
          if (up != nullptr) {
            u[j] = up[r * V + ip[r * K + j]];
          } else {
            const scalar_t* er = ep + ip[r * K + j] * d;
            scalar_t dot = 0;
            for (int64_t c = 0; c < d; ++c) dot += gr[c] * er[c];
            u[j] = b * dot;
          }
          ubar += wj * u[j];
        }
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t wj = wp[r * K + j];
          if (wj != scalar_t(0)) o[r * V + ip[r * K + j]] = wj * (u[j] - ubar) / T;
        }
      }
    });
  }
  if (mask[2] && dense) {
    ge = at::zeros(weight.sizes(), weight.options());
    ge.narrow(0, 0, V).addmm_(W.t(), gb);
  } else if (mask[2]) {
    // Parallel over columns: a kept row repeated across the batch is summed by one thread, in a
    // fixed order (deterministic, no atomics).
    ge = lazy_zeros(weight.sizes(), weight.options(), sizeof(scalar_t));
    scalar_t* o = ge.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, d, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t r = 0; r < N; ++r) {
        const scalar_t* gr = gp + r * d;
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t wj = wp[r * K + j];
          if (wj == scalar_t(0)) continue;
          const scalar_t coef = b * wj;
          scalar_t* dst = o + ip[r * K + j] * d;
          for (int64_t c = c0; c < c1; ++c) dst[c] += coef * gr[c];
        }
      }
    });
  }
  auto none = [&]() { return at::empty({0}, g.options()); };
  return {mask[0] ? gh : none(), mask[1] ? gl : none(), mask[2] ? ge : none()};
}

void check_cpu_dtype(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "ltscale::context_prediction_fusion (CPU kernel): float32 or float64 only, got ", t.scalar_type(),
              "; use impl='torch' for other dtypes");
}

std::tuple<Tensor, Tensor, Tensor> forward_cpu(const Tensor& hidden, const Tensor& logits, const Tensor& weight,
                                               double alpha, double temperature, double top_p,
                                               int64_t exclude_token_id) {
  check_forward_args(hidden, logits, weight, alpha, temperature, top_p, exclude_token_id);
  check_cpu_dtype(hidden);
  const Tensor h = hidden.contiguous(), l = logits.contiguous(), e = weight.contiguous();
  if (h.scalar_type() == at::kDouble) {
    return forward_cpu_impl<double>(h, l, e, alpha, temperature, top_p, exclude_token_id);
  }
  return forward_cpu_impl<float>(h, l, e, alpha, temperature, top_p, exclude_token_id);
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_out, const Tensor& weight, const Tensor& idx,
                                                const Tensor& w, double alpha, double temperature, int64_t vocab,
                                                std::array<bool, 3> output_mask) {
  check_cpu_dtype(weight);
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type() && w.scalar_type() == weight.scalar_type(),
              "ltscale::context_prediction_fusion_backward: dtype mismatch");
  TORCH_CHECK(idx.dim() == 2 && w.sizes() == idx.sizes() && idx.size(0) == grad_out.size(0),
              "ltscale::context_prediction_fusion_backward: idx/w do not match grad_out");
  const Tensor g = grad_out.contiguous(), e = weight.contiguous(), i = idx.contiguous(), ww = w.contiguous();
  if (g.scalar_type() == at::kDouble) {
    return backward_cpu_impl<double>(g, e, i, ww, alpha, temperature, vocab, output_mask);
  }
  return backward_cpu_impl<float>(g, e, i, ww, alpha, temperature, vocab, output_mask);
}

}  // namespace

TORCH_LIBRARY(ltscale, m) {
  m.def(
      "context_prediction_fusion_forward(Tensor hidden, Tensor logits, Tensor weight, float alpha, "
      "float temperature, float top_p, int exclude_token_id) -> (Tensor, Tensor, Tensor)");
  m.def(
      "context_prediction_fusion_backward(Tensor grad_out, Tensor weight, Tensor idx, Tensor w, float alpha, "
      "float temperature, int vocab, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ltscale, CPU, m) {
  m.impl("context_prediction_fusion_forward", &forward_cpu);
  m.impl("context_prediction_fusion_backward", &backward_cpu);
}

}  // namespace ltscale

// A bare extension module: `import ltscale._C` loads this .so, which registers the ops above.
// Build facts for `ltscale env` ride along as module constants.
static struct PyModuleDef ltscale_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                              "ltscale native ops (torch.ops.ltscale.*)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&ltscale_c_module);
  if (mod == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(mod, "built_with_cuda", 1);
  PyModule_AddStringConstant(mod, "cuda_archs", LTSCALE_STR(LTSCALE_CUDA_ARCHS));
#else
  PyModule_AddIntConstant(mod, "built_with_cuda", 0);
  PyModule_AddStringConstant(mod, "cuda_archs", "");
#endif
  return mod;
}
