// Fused threshold + column-skipping GEMV for CPU decode (our own code).
//
// y[r, :] = sum over input channels i with |x[r, i]| * scale[i] > threshold of
//           x[r, i] * wt[i, :]   (+ bias)
//
// wt is W transposed, (in, out) row-major, so a skipped channel is one contiguous row
// that is never read. The pure-torch path needs ~9 ATen ops per projection (abs, gt,
// nonzero, gather, index arithmetic, embedding_bag, ...); at ~4 us of dispatch each that
// overhead ate most of the saving on a 135M model, so this does it in one call.
// Work is split over output columns when they are wide, else over the kept rows.
// `Decoder` runs a whole decode step through every block in one call (see there).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// Output slices narrower than this per thread are split over kept rows instead.
constexpr int64_t kOutSplit = 2048;

// y[o0:o1] += sum_{j in [j0, j1)} val[j] * wt[idx[j], o0:o1], four rows at a time so y is
// loaded and stored once per four weight rows (and four read streams run in parallel).
inline void accumulate(float* __restrict y, const float* __restrict wp, int64_t out,
                       const int64_t* ip, const float* vp, int64_t j0, int64_t j1,
                       int64_t o0, int64_t o1) {
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const float v0 = vp[j], v1 = vp[j + 1], v2 = vp[j + 2], v3 = vp[j + 3];
    const float* __restrict w0 = wp + ip[j] * out;
    const float* __restrict w1 = wp + ip[j + 1] * out;
    const float* __restrict w2 = wp + ip[j + 2] * out;
    const float* __restrict w3 = wp + ip[j + 3] * out;
    for (int64_t o = o0; o < o1; ++o) y[o] += v0 * w0[o] + v1 * w1[o] + v2 * w2[o] + v3 * w3[o];
  }
  for (; j < j1; ++j) {
    const float v = vp[j];
    const float* __restrict w = wp + ip[j] * out;
    for (int64_t o = o0; o < o1; ++o) y[o] += v * w[o];
  }
}

// The shared GEMV: x (b, in) contiguous, wt (in, out). thr < 0 keeps every channel.
// Returns y (b, out), bias added, and the number of kept (row, channel) pairs.
std::tuple<torch::Tensor, int64_t> gemv(const torch::Tensor& xc, const torch::Tensor& wt,
                                        const float* sp, float thr, const torch::Tensor& bias) {
  const int64_t b = xc.size(0), in = xc.size(1), out = wt.size(1);
  const float* xp = xc.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();

  std::vector<int64_t> idx;
  std::vector<float> val;
  std::vector<int64_t> start(b + 1, 0);
  idx.reserve(b * in);
  val.reserve(b * in);
  for (int64_t r = 0; r < b; ++r) {
    const float* xr = xp + r * in;
    for (int64_t i = 0; i < in; ++i) {
      const float v = xr[i];
      const float s = std::fabs(v) * (sp ? sp[i] : 1.0f);
      if (s > thr) {
        idx.push_back(i);
        val.push_back(v);
      }
    }
    start[r + 1] = static_cast<int64_t>(idx.size());
  }

  auto y = bias.numel() ? bias.reshape({1, out}).repeat({b, 1}) : torch::zeros({b, out}, xc.options());
  float* yp = y.data_ptr<float>();
  const int64_t* ip = idx.data();
  const float* vp = val.data();
  const int64_t* st = start.data();
  const int nt = at::get_num_threads();
  if (out >= kOutSplit * nt) {
    // Wide output: each thread owns a slice of y, no reduction.
    at::parallel_for(0, out, kOutSplit, [&](int64_t o0, int64_t o1) {
      for (int64_t r = 0; r < b; ++r) accumulate(yp + r * out, wp, out, ip, vp, st[r], st[r + 1], o0, o1);
    });
  } else {
    // Narrow output (e.g. down_proj, 896 wide): slices of a row would be short strided
    // reads, so threads split the kept rows instead, each into its own full-width partial
    // sum, added at the end (out floats per thread: a few KB).
    std::vector<float> part(static_cast<size_t>(nt) * b * out, 0.0f);
    for (int64_t r = 0; r < b; ++r) {
      at::parallel_for(st[r], st[r + 1], 32, [&](int64_t j0, int64_t j1) {
        float* acc = part.data() + (static_cast<int64_t>(at::get_thread_num()) * b + r) * out;
        accumulate(acc, wp, out, ip, vp, j0, j1, 0, out);
      });
    }
    for (int t = 0; t < nt; ++t)
      for (int64_t k = 0; k < b * out; ++k) yp[k] += part[static_cast<size_t>(t) * b * out + k];
  }
  return {y, static_cast<int64_t>(idx.size())};
}

// y = x * rsqrt(mean(x^2) + eps) * w, row by row (fp32, as HF's RMSNorm computes it).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const int64_t b = x.size(0), n = x.size(1);
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < b; ++r) {
    const float* xr = xp + r * n;
    float ss = 0.0f;
    for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) yp[r * n + i] = wp[i] * (xr[i] * inv);
  }
  return y;
}

}  // namespace

std::tuple<torch::Tensor, int64_t> sparse_gemv(
    const torch::Tensor& x, const torch::Tensor& wt, const torch::Tensor& scale,
    double threshold, const torch::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2, "x (b, in) and wt (in, out) expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && wt.scalar_type() == torch::kFloat,
              "float32 only");
  TORCH_CHECK(wt.is_contiguous(), "wt must be contiguous");
  TORCH_CHECK(wt.size(0) == x.size(1), "shape mismatch");
  const float* sp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  return gemv(x.contiguous(), wt, sp, static_cast<float>(threshold), bias);
}

// One decode step (one new token per row) through every block of a llama-style model in
// a single call. Why: per token the Python runtime issues ~25 small ATen ops per layer
// around the four projections (norms, RoPE, cache writes, reshapes, SiLU, residuals), at
// ~5-10 us of Python + dispatch each: ~20% of a 135M model's decode step, paid equally
// by dense and sparse, so it dilutes the speedup of skipping. Here they are plain loops;
// attention itself stays ATen's scaled_dot_product_attention, as in the Python path.
// Supports what the runtime's fast path needs: SiLU-gated MLP, TEAL/WINA thresholds
// (optionally scaled), biases, GQA; everything else (CATS, R-Sparse, CoreInfer) stays on
// the Python path.
class Decoder {
 public:
  // Per layer, `tensors` holds 18 entries: attn_norm, mlp_norm, then for qkv, o, gate|up
  // and down: wt (in, out), w (out, in), bias, scale (empty tensors when absent).
  // `thresholds` has 4 per layer (<= 0: no rule), `torch_dense` 4 per layer (dense calls
  // use at::linear), `eps` 2 per layer.
  Decoder(std::vector<torch::Tensor> tensors, std::vector<double> thresholds,
          std::vector<bool> torch_dense, std::vector<double> eps, int64_t hq, int64_t hk,
          int64_t d)
      : t_(std::move(tensors)), thr_(std::move(thresholds)), td_(std::move(torch_dense)),
        eps_(std::move(eps)), hq_(hq), hk_(hk), d_(d) {
    TORCH_CHECK(t_.size() % kPerLayer == 0, "18 tensors per layer expected");
    layers_ = static_cast<int64_t>(t_.size()) / kPerLayer;
    TORCH_CHECK(static_cast<int64_t>(thr_.size()) == 4 * layers_ &&
                    static_cast<int64_t>(td_.size()) == 4 * layers_ &&
                    static_cast<int64_t>(eps_.size()) == 2 * layers_,
                "per-layer lists disagree");
  }

  void set_caches(std::vector<torch::Tensor> caches) {
    TORCH_CHECK(static_cast<int64_t>(caches.size()) == 2 * layers_, "2 caches per layer");
    caches_ = std::move(caches);
  }

  // x (b, hidden) at position pos; cos, sin (d) are that position's rows (sin sign-folded,
  // see DecodeRuntime._rope). counts (4 * layers, 2) int64 gets kept / seen channels of
  // the thresholded projections added. Returns the hidden state after the last block.
  torch::Tensor step(torch::Tensor x, int64_t pos, bool sparse, const torch::Tensor& cos,
                     const torch::Tensor& sin, torch::Tensor counts) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x (b, hidden) fp32");
    TORCH_CHECK(static_cast<int64_t>(caches_.size()) == 2 * layers_, "set_caches first");
    x = x.contiguous().clone();
    const int64_t b = x.size(0);
    int64_t* cnt = counts.data_ptr<int64_t>();
    for (int64_t l = 0; l < layers_; ++l) {
      const torch::Tensor* t = t_.data() + l * kPerLayer;
      auto h = rms_norm(x, t[0], eps_[2 * l]);
      auto qkv = proj(l, 0, h, sparse, cnt);  // (b, (hq + 2 hk) d)
      rope_and_cache(qkv, l, pos, cos, sin);
      auto q = qkv.view({b, hq_ + 2 * hk_, d_}).narrow(1, 0, hq_).unsqueeze(2);
      auto k = caches_[2 * l].narrow(2, 0, pos + 1);
      auto v = caches_[2 * l + 1].narrow(2, 0, pos + 1);
      auto att = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, false,
                                                  std::nullopt, hq_ != hk_);
      add_into(x, proj(l, 1, att.reshape({b, hq_ * d_}), sparse, cnt));
      h = rms_norm(x, t[1], eps_[2 * l + 1]);
      auto gu = proj(l, 2, h, sparse, cnt);  // (b, 2 inter): gate | up
      const int64_t inter = gu.size(1) / 2;
      auto a = torch::empty({b, inter}, x.options());
      const float* gp = gu.data_ptr<float>();
      float* ap = a.data_ptr<float>();
      for (int64_t r = 0; r < b; ++r)
        for (int64_t i = 0; i < inter; ++i) {
          const float g = gp[r * 2 * inter + i];
          ap[r * inter + i] = g / (1.0f + std::exp(-g)) * gp[r * 2 * inter + inter + i];
        }
      add_into(x, proj(l, 3, a, sparse, cnt));
    }
    return x;
  }

 private:
  static constexpr int64_t kPerLayer = 18;

  torch::Tensor proj(int64_t l, int p, const torch::Tensor& hin, bool sparse, int64_t* cnt) {
    const auto h = hin.contiguous();
    const torch::Tensor* t = t_.data() + l * kPerLayer + 2 + 4 * p;  // wt, w, bias, scale
    const int64_t k = 4 * l + p;
    const double thr = thr_[k];
    if (sparse && thr > 0) {
      const float* sp = t[3].numel() ? t[3].data_ptr<float>() : nullptr;
      auto [y, kept] = gemv(h, t[0], sp, static_cast<float>(thr), t[2]);
      cnt[2 * k] += kept;
      cnt[2 * k + 1] += h.numel();
      return y;
    }
    if (td_[k]) {
      return at::linear(h, t[1], t[2].numel() ? std::optional<at::Tensor>(t[2]) : std::nullopt);
    }
    return std::get<0>(gemv(h, t[0], nullptr, -1.0f, t[2]));
  }

  // Rotate q and k heads in place (x cos + rotate_half(x) sin) and write k, v at pos.
  void rope_and_cache(torch::Tensor& qkv, int64_t l, int64_t pos, const torch::Tensor& cos,
                      const torch::Tensor& sin) {
    const int64_t b = qkv.size(0), heads = hq_ + 2 * hk_, half = d_ / 2;
    float* p = qkv.data_ptr<float>();
    const float* c = cos.data_ptr<float>();
    const float* s = sin.data_ptr<float>();
    std::vector<float> tmp(d_);
    auto& kc = caches_[2 * l];
    auto& vc = caches_[2 * l + 1];
    const int64_t max_len = kc.size(2);
    float* kp = kc.data_ptr<float>();
    float* vp = vc.data_ptr<float>();
    for (int64_t r = 0; r < b; ++r) {
      float* row = p + r * heads * d_;
      for (int64_t hd = 0; hd < hq_ + hk_; ++hd) {
        float* e = row + hd * d_;
        for (int64_t i = 0; i < d_; ++i) tmp[i] = e[i];
        for (int64_t i = 0; i < d_; ++i) {
          const float rolled = i < half ? tmp[i + half] : tmp[i - half];
          e[i] = tmp[i] * c[i] + rolled * s[i];
        }
      }
      for (int64_t g = 0; g < hk_; ++g) {
        const int64_t at_pos = ((r * hk_ + g) * max_len + pos) * d_;
        std::copy_n(row + (hq_ + g) * d_, d_, kp + at_pos);
        std::copy_n(row + (hq_ + hk_ + g) * d_, d_, vp + at_pos);
      }
    }
  }

  static void add_into(torch::Tensor& x, const torch::Tensor& y) {
    float* xp = x.data_ptr<float>();
    const auto yc = y.contiguous();
    const float* yp = yc.data_ptr<float>();
    for (int64_t i = 0, n = x.numel(); i < n; ++i) xp[i] += yp[i];
  }

  std::vector<torch::Tensor> t_;
  std::vector<double> thr_;
  std::vector<bool> td_;
  std::vector<double> eps_;
  std::vector<torch::Tensor> caches_;
  int64_t hq_, hk_, d_, layers_ = 0;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_gemv", &sparse_gemv, "thresholded column-skipping GEMV (CPU, fp32)");
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<std::vector<torch::Tensor>, std::vector<double>, std::vector<bool>,
                    std::vector<double>, int64_t, int64_t, int64_t>())
      .def("set_caches", &Decoder::set_caches)
      .def("step", &Decoder::step);
}
