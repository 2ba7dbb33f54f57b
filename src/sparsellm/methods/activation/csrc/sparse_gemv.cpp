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
#include <limits>
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

// Reusable buffers of one caller (the Decoder keeps one; a plain call makes its own):
// the decode step then allocates nothing per projection.
struct Scratch {
  std::vector<int64_t> idx;
  std::vector<float> val;
  std::vector<int64_t> start;
  std::vector<float> part;
};

// The shared GEMV: x (b, in) row-major, wt (in, out). thr < 0 keeps every channel.
// Writes y (b, out) with bias added; returns the number of kept (row, channel) pairs.
int64_t gemv_into(const float* xp, int64_t b, int64_t in, const float* wp, int64_t out,
                  const float* sp, float thr, const float* bias, float* yp, Scratch& s) {
  s.idx.resize(static_cast<size_t>(b * in));
  s.val.resize(static_cast<size_t>(b * in));
  s.start.assign(static_cast<size_t>(b + 1), 0);
  int64_t n = 0;
  for (int64_t r = 0; r < b; ++r) {
    const float* xr = xp + r * in;
    for (int64_t i = 0; i < in; ++i) {
      const float v = xr[i];
      if (std::fabs(v) * (sp ? sp[i] : 1.0f) > thr) {
        s.idx[n] = i;
        s.val[n++] = v;
      }
    }
    s.start[r + 1] = n;
  }
  for (int64_t r = 0; r < b; ++r) {
    if (bias) std::copy_n(bias, out, yp + r * out);
    else std::fill_n(yp + r * out, out, 0.0f);
  }
  const int64_t* ip = s.idx.data();
  const float* vp = s.val.data();
  const int64_t* st = s.start.data();
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
    s.part.assign(static_cast<size_t>(nt) * b * out, 0.0f);
    float* part = s.part.data();
    for (int64_t r = 0; r < b; ++r) {
      at::parallel_for(st[r], st[r + 1], 32, [&](int64_t j0, int64_t j1) {
        float* acc = part + (static_cast<int64_t>(at::get_thread_num()) * b + r) * out;
        accumulate(acc, wp, out, ip, vp, j0, j1, 0, out);
      });
    }
    for (int t = 0; t < nt; ++t)
      for (int64_t k = 0; k < b * out; ++k) yp[k] += part[static_cast<size_t>(t) * b * out + k];
  }
  return n;
}

// y = x * rsqrt(mean(x^2) + eps) * w, row by row (fp32, as HF's RMSNorm computes it).
void rms_norm(const float* xp, int64_t b, int64_t n, const float* wp, double eps, float* yp) {
  for (int64_t r = 0; r < b; ++r) {
    const float* xr = xp + r * n;
    float ss = 0.0f;
    for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) yp[r * n + i] = wp[i] * (xr[i] * inv);
  }
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
  const auto xc = x.contiguous();
  const int64_t b = xc.size(0), out = wt.size(1);
  auto y = torch::empty({b, out}, xc.options());
  Scratch s;
  const int64_t kept = gemv_into(xc.data_ptr<float>(), b, xc.size(1), wt.data_ptr<float>(), out,
                                 scale.numel() ? scale.data_ptr<float>() : nullptr,
                                 static_cast<float>(threshold),
                                 bias.numel() ? bias.data_ptr<float>() : nullptr,
                                 y.data_ptr<float>(), s);
  return {y, kept};
}

// One decode step (one new token per row) through every block of a llama-style model in
// a single call. Why: per token the Python runtime issues ~25 small ATen ops per layer
// around the four projections (norms, RoPE, cache writes, reshapes, SiLU, residuals), at
// ~5-10 us of Python + dispatch each: ~20% of a 135M model's decode step, paid equally
// by dense and sparse, so it dilutes the speedup of skipping. Here they are plain loops
// over buffers the Decoder owns, attention and the final norm included, so a step
// allocates no tensors but its output (attention keeps a score row and an accumulator
// per call). Measured on the default model (every channel
// skipped, so only this overhead is left): 2.3 ms a step when it still called ATen's
// SDPA and allocated its intermediates (perf: SDPA's GEMV, malloc and autograd view
// bookkeeping), 1.1 ms now, against ~11 ms for a 50%-sparse step. Supports what the
// runtime's fast path needs: SiLU-gated MLP, TEAL/WINA thresholds (optionally scaled),
// biases, GQA; everything else (CATS, R-Sparse, CoreInfer) stays on the Python path.
class Decoder {
 public:
  // Per layer, `tensors` holds 18 entries: attn_norm, mlp_norm, then for qkv, o, gate|up
  // and down: wt (in, out), w (out, in), bias, scale (empty tensors when absent).
  // `thresholds` has 4 per layer (<= 0: no rule), `torch_dense` 4 per layer (dense calls
  // use at::linear), `eps` 2 per layer. `final_norm` (with `final_eps`) is applied to
  // the step's output.
  Decoder(std::vector<torch::Tensor> tensors, std::vector<double> thresholds,
          std::vector<bool> torch_dense, std::vector<double> eps, int64_t hq, int64_t hk,
          int64_t d, torch::Tensor final_norm, double final_eps)
      : t_(std::move(tensors)), thr_(std::move(thresholds)), td_(std::move(torch_dense)),
        eps_(std::move(eps)), final_norm_(std::move(final_norm)), final_eps_(final_eps),
        hq_(hq), hk_(hk), d_(d) {
    TORCH_CHECK(t_.size() % kPerLayer == 0, "18 tensors per layer expected");
    layers_ = static_cast<int64_t>(t_.size()) / kPerLayer;
    TORCH_CHECK(static_cast<int64_t>(thr_.size()) == 4 * layers_ &&
                    static_cast<int64_t>(td_.size()) == 4 * layers_ &&
                    static_cast<int64_t>(eps_.size()) == 2 * layers_,
                "per-layer lists disagree");
    TORCH_CHECK(hk_ > 0 && hq_ % hk_ == 0, "query heads must be a multiple of kv heads");
    for (const auto& w : t_)
      TORCH_CHECK(!w.numel() || (w.is_contiguous() && w.scalar_type() == torch::kFloat),
                  "contiguous fp32 tensors expected");
  }

  void set_caches(std::vector<torch::Tensor> caches) {
    TORCH_CHECK(static_cast<int64_t>(caches.size()) == 2 * layers_, "2 caches per layer");
    for (const auto& c : caches) TORCH_CHECK(c.is_contiguous(), "contiguous caches expected");
    caches_ = std::move(caches);
  }

  // x (b, hidden) at position pos; cos, sin (d) are that position's rows (sin sign-folded,
  // see DecodeRuntime._rope). counts (4 * layers, 2) int64 gets kept / seen channels of
  // the thresholded projections added. Returns the final-normed hidden state after the
  // last block.
  torch::Tensor step(torch::Tensor x, int64_t pos, bool sparse, const torch::Tensor& cos,
                     const torch::Tensor& sin, torch::Tensor counts) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x (b, hidden) fp32");
    TORCH_CHECK(static_cast<int64_t>(caches_.size()) == 2 * layers_, "set_caches first");
    TORCH_CHECK(pos >= 0 && pos < caches_[0].size(2), "position beyond the cache");
    x = x.contiguous().clone();
    const int64_t b = x.size(0), hid = x.size(1);
    float* xp = x.data_ptr<float>();
    int64_t* cnt = counts.data_ptr<int64_t>();
    const auto cos_c = cos.contiguous(), sin_c = sin.contiguous();  // alive for the step
    const float* c = cos_c.data_ptr<float>();
    const float* sn = sin_c.data_ptr<float>();
    for (int64_t l = 0; l < layers_; ++l) {
      const torch::Tensor* t = t_.data() + l * kPerLayer;
      rms_norm(xp, b, hid, t[0].data_ptr<float>(), eps_[2 * l], buf(h_, b * hid));
      const int64_t nqkv = (hq_ + 2 * hk_) * d_;
      float* qkv = buf(qkv_, b * nqkv);
      proj(l, 0, h_.data(), b, hid, qkv, sparse, cnt);
      rope_and_cache(qkv, b, l, pos, c, sn);
      float* att = buf(att_, b * hq_ * d_);
      attend(qkv, b, l, pos, att);
      float* y = buf(y_, b * hid);
      proj(l, 1, att, b, hq_ * d_, y, sparse, cnt);
      for (int64_t i = 0; i < b * hid; ++i) xp[i] += y[i];
      rms_norm(xp, b, hid, t[1].data_ptr<float>(), eps_[2 * l + 1], h_.data());
      const int64_t inter = t[2 + 4 * 3].size(0);  // down's wt is (inter, hidden)
      float* gu = buf(gu_, b * 2 * inter);
      proj(l, 2, h_.data(), b, hid, gu, sparse, cnt);  // (b, 2 inter): gate | up
      float* a = buf(a_, b * inter);
      for (int64_t r = 0; r < b; ++r)
        for (int64_t i = 0; i < inter; ++i) {
          const float g = gu[r * 2 * inter + i];
          a[r * inter + i] = g / (1.0f + std::exp(-g)) * gu[r * 2 * inter + inter + i];
        }
      proj(l, 3, a, b, inter, y, sparse, cnt);
      for (int64_t i = 0; i < b * hid; ++i) xp[i] += y[i];
    }
    auto out = torch::empty_like(x);
    rms_norm(xp, b, hid, final_norm_.data_ptr<float>(), final_eps_, out.data_ptr<float>());
    return out;
  }

 private:
  static constexpr int64_t kPerLayer = 18;
  // Cache lengths from which attention splits its heads over threads (below, waking the
  // other thread costs about what it saves).
  static constexpr int64_t kParallelAttention = 512;

  // Size a reusable buffer (grows once, then stays) and return its data.
  static float* buf(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
    return v.data();
  }

  // y (b, out) = projection p of layer l applied to h (b, in).
  void proj(int64_t l, int p, const float* h, int64_t b, int64_t in, float* y, bool sparse,
            int64_t* cnt) {
    const torch::Tensor* t = t_.data() + l * kPerLayer + 2 + 4 * p;  // wt, w, bias, scale
    const int64_t k = 4 * l + p, out = t[0].size(1);
    const float* bias = t[2].numel() ? t[2].data_ptr<float>() : nullptr;
    const double thr = thr_[k];
    if (sparse && thr > 0) {
      const float* sp = t[3].numel() ? t[3].data_ptr<float>() : nullptr;
      cnt[2 * k] += gemv_into(h, b, in, t[0].data_ptr<float>(), out, sp,
                              static_cast<float>(thr), bias, y, scratch_);
      cnt[2 * k + 1] += b * in;
      return;
    }
    if (td_[k]) {  // measured faster for this shape: ATen's GEMV, written into y
      const auto opt = torch::TensorOptions().dtype(torch::kFloat);
      auto hin = torch::from_blob(const_cast<float*>(h), {b, in}, opt);
      auto yt = torch::from_blob(y, {b, out}, opt);
      if (bias) at::addmm_out(yt, t[2], hin, t[1].t());
      else at::mm_out(yt, hin, t[1].t());
      return;
    }
    gemv_into(h, b, in, t[0].data_ptr<float>(), out, nullptr, -1.0f, bias, y, scratch_);
  }

  // Rotate q and k heads in place (x cos + rotate_half(x) sin) and write k, v at pos.
  void rope_and_cache(float* p, int64_t b, int64_t l, int64_t pos, const float* c,
                      const float* s) {
    const int64_t heads = hq_ + 2 * hk_, half = d_ / 2;
    float* tmp = buf(tmp_, d_);
    auto& kc = caches_[2 * l];
    auto& vc = caches_[2 * l + 1];
    const int64_t max_len = kc.size(2);
    float* kp = kc.data_ptr<float>();
    float* vp = vc.data_ptr<float>();
    for (int64_t r = 0; r < b; ++r) {
      float* row = p + r * heads * d_;
      for (int64_t hd = 0; hd < hq_ + hk_; ++hd) {
        float* e = row + hd * d_;
        std::copy_n(e, d_, tmp);
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

  // att (b, hq * d): softmax(q k^T / sqrt(d)) v for each query head over cache positions
  // 0..pos, query head h reading kv head h / (hq / hk) (GQA, as HF's repeat_kv). Short
  // contexts run on this thread; long ones split the query heads over threads.
  void attend(const float* qkv, int64_t b, int64_t l, int64_t pos, float* att) {
    const int64_t d = d_;
    const int64_t heads = hq_ + 2 * hk_, n = pos + 1, grp = hq_ / hk_;
    const int64_t max_len = caches_[2 * l].size(2);
    const float* kp = caches_[2 * l].data_ptr<float>();
    const float* vp = caches_[2 * l + 1].data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    constexpr int kLanes = 16;  // fixed-width partial sums vectorise without -ffast-math
    auto body = [&](int64_t u0, int64_t u1) {
      std::vector<float> sc(static_cast<size_t>(n));
      std::vector<float> acc(static_cast<size_t>(d));
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t r = u / hq_, h = u % hq_, g = h / grp;
        const float* q = qkv + r * heads * d + h * d;
        const float* K = kp + (r * hk_ + g) * max_len * d;
        const float* V = vp + (r * hk_ + g) * max_len * d;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          const float* kj = K + j * d;
          float lanes[kLanes] = {};
          int64_t i = 0;
          for (; i + kLanes <= d; i += kLanes)
            for (int k = 0; k < kLanes; ++k) lanes[k] += q[i + k] * kj[i + k];
          float dot = 0.0f;
          for (; i < d; ++i) dot += q[i] * kj[i];
          for (int k = 0; k < kLanes; ++k) dot += lanes[k];
          sc[j] = dot * scale;
          m = std::max(m, sc[j]);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          sc[j] = std::exp(sc[j] - m);
          sum += sc[j];
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < n; ++j) {
          const float w = sc[j];
          const float* vj = V + j * d;
          for (int64_t i = 0; i < d; ++i) acc[i] += w * vj[i];
        }
        float* o = att + (r * hq_ + h) * d;
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < d; ++i) o[i] = acc[i] * inv;
      }
    };
    const int64_t units = b * hq_;
    if (n < kParallelAttention) body(0, units);
    else at::parallel_for(0, units, 1, body);
  }

  std::vector<torch::Tensor> t_;
  std::vector<double> thr_;
  std::vector<bool> td_;
  std::vector<double> eps_;
  torch::Tensor final_norm_;
  double final_eps_;
  std::vector<torch::Tensor> caches_;
  int64_t hq_, hk_, d_, layers_ = 0;
  Scratch scratch_;
  std::vector<float> h_, qkv_, att_, y_, gu_, a_, tmp_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_gemv", &sparse_gemv, "thresholded column-skipping GEMV (CPU, fp32)");
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<std::vector<torch::Tensor>, std::vector<double>, std::vector<bool>,
                    std::vector<double>, int64_t, int64_t, int64_t, torch::Tensor, double>())
      .def("set_caches", &Decoder::set_caches)
      .def("step", &Decoder::step);
}
