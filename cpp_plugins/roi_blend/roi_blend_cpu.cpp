// CPU implementation of sepsnet::roi_blend: at::parallel_for over instances. It shares the ROI
// geometry and sampling taps of roi_blend_kernel.cuh (RoiGeom, AxisTap) but not the per-pixel blend:
// it works row by row with its own vectorisable softmax (exp_nonpositive below), which was faster
// than calling blend_pixel per pixel; fp32 accumulation for every input dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <vector>

#include "roi_blend_kernel.cuh"

namespace sepsnet {
namespace roi_blend {

namespace {

// exp(x) for x <= 0 (softmax after subtracting the max): Cody-Waite range reduction and a
// degree-6 polynomial (the classic single-precision expf scheme, ~1 ulp); branch-free so the
// pixel loop vectorises, unlike the libm call.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float fx = x * 1.44269504088896341f + 0.5f;  // in [-125, 0.5]
  const int32_t n = static_cast<int32_t>(fx + 128.0f) - 128;  // floor(fx): truncation of a positive
  const float fn = static_cast<float>(n);
  x = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  return y * std::bit_cast<float>((n + 127) << 23);
}

// Sampling taps of one axis as structure-of-arrays; an invalid sample (torchvision returns 0)
// gets zero weights, so the inner loop has no branch and equals torchvision's sum otherwise.
struct Taps {
  std::vector<int32_t> lo, hi;
  std::vector<float> w_lo, w_hi;
  void set(size_t n) { lo.resize(n); hi.resize(n); w_lo.resize(n); w_hi.resize(n); }
  void put(size_t i, const AxisTap& t) {
    lo[i] = t.lo;
    hi[i] = t.hi;
    w_lo[i] = t.valid ? t.w_lo : 0.f;
    w_hi[i] = t.valid ? t.w_hi : 0.f;
  }
};

// Per-thread buffers of one instance.
struct InstanceScratch {
  std::vector<float> attn_rows;  // K x M x R: attention interpolated along x
  std::vector<float> arow, crow;  // K x R: one output row of attention logits and of crops
  std::vector<float> mx, denom, numer;  // R
  Taps ty, tx;
  InstanceScratch(int64_t k, int64_t m, int64_t r)
      : attn_rows(k * m * r), arow(k * r), crow(k * r), mx(r), denom(r), numer(r) {}
};

// One instance, row by row: the per-element math of blend_pixel (roi_blend_kernel.cuh), with the
// sampling taps computed once per row/column and the attention upsampled separably (x then y,
// the PyTorch order); softmax over K and the sum are done on whole rows.
template <typename T>
void blend_instance(const T* img, const T* att, T* dst, const RoiGeom& g, const std::vector<AxisTap>& up,
                    InstanceScratch& ws, int64_t k, int64_t h, int64_t w, int64_t m, int64_t r) {
  const int gh = g.grid_h > 0 ? g.grid_h : 0, gw = g.grid_w > 0 ? g.grid_w : 0;
  ws.ty.set(r * gh);
  ws.tx.set(r * gw);
  for (int64_t p = 0; p < r; ++p) {
    for (int s = 0; s < gh; ++s)
      ws.ty.put(p * gh + s, roi_tap(g.y0 + p * g.bin_h + (s + 0.5f) * g.bin_h / static_cast<float>(g.grid_h),
                                    static_cast<int>(h)));
    for (int s = 0; s < gw; ++s)
      ws.tx.put(p * gw + s, roi_tap(g.x0 + p * g.bin_w + (s + 0.5f) * g.bin_w / static_cast<float>(g.grid_w),
                                    static_cast<int>(w)));
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    const T* plane = att + kk * m * m;
    float* rows = ws.attn_rows.data() + kk * m * r;
    for (int64_t yy = 0; yy < m; ++yy)
      for (int64_t pw = 0; pw < r; ++pw) {
        const AxisTap& t = up[pw];
        rows[yy * r + pw] = t.w_lo * to_float(plane[yy * m + t.lo]) + t.w_hi * to_float(plane[yy * m + t.hi]);
      }
  }
  const int32_t* xl = ws.tx.lo.data();
  const int32_t* xh = ws.tx.hi.data();
  const float* wxl = ws.tx.w_lo.data();
  const float* wxh = ws.tx.w_hi.data();
  for (int64_t ph = 0; ph < r; ++ph) {
    const AxisTap& ua = up[ph];
    for (int64_t kk = 0; kk < k; ++kk) {
      const float* __restrict__ r0 = ws.attn_rows.data() + (kk * m + ua.lo) * r;
      const float* __restrict__ r1 = ws.attn_rows.data() + (kk * m + ua.hi) * r;
      float* __restrict__ arow = ws.arow.data() + kk * r;
      for (int64_t pw = 0; pw < r; ++pw) arow[pw] = ua.w_lo * r0[pw] + ua.w_hi * r1[pw];
      const T* base = img + kk * h * w;
      float* __restrict__ crow = ws.crow.data() + kk * r;
      for (int64_t pw = 0; pw < r; ++pw) crow[pw] = 0.f;
      for (int sy = 0; sy < gh; ++sy) {
        const int64_t ti = ph * gh + sy;
        const T* lo_row = base + static_cast<int64_t>(ws.ty.lo[ti]) * w;
        const T* hi_row = base + static_cast<int64_t>(ws.ty.hi[ti]) * w;
        const float wyl = ws.ty.w_lo[ti], wyh = ws.ty.w_hi[ti];
        for (int64_t pw = 0; pw < r; ++pw) {
          float acc = crow[pw];
          for (int sx = 0; sx < gw; ++sx) {
            const int64_t j = pw * gw + sx;
            acc += (wyl * wxl[j]) * to_float(lo_row[xl[j]]) + (wyl * wxh[j]) * to_float(lo_row[xh[j]]) +
                   (wyh * wxl[j]) * to_float(hi_row[xl[j]]) + (wyh * wxh[j]) * to_float(hi_row[xh[j]]);
          }
          crow[pw] = acc;
        }
      }
      for (int64_t pw = 0; pw < r; ++pw) crow[pw] *= g.inv_count;
    }
    float* __restrict__ mx = ws.mx.data();
    float* __restrict__ den = ws.denom.data();
    float* __restrict__ num = ws.numer.data();
    const float* __restrict__ arow = ws.arow.data();
    const float* __restrict__ crow = ws.crow.data();
    for (int64_t pw = 0; pw < r; ++pw) {
      mx[pw] = arow[pw];
      den[pw] = 0.f;
      num[pw] = 0.f;
    }
    for (int64_t kk = 1; kk < k; ++kk)
      for (int64_t pw = 0; pw < r; ++pw) mx[pw] = std::max(mx[pw], arow[kk * r + pw]);
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t pw = 0; pw < r; ++pw) {
        const float e = exp_nonpositive(arow[kk * r + pw] - mx[pw]);
        den[pw] += e;
        num[pw] += e * crow[kk * r + pw];
      }
    T* out_row = dst + ph * r;
    for (int64_t pw = 0; pw < r; ++pw) out_row[pw] = from_float<T>(num[pw] / den[pw]);
  }
}

}  // namespace

void check_inputs(const at::Tensor& bases, const at::Tensor& rois, const at::Tensor& attention,
                  int64_t out_size, int64_t sampling_ratio) {
  TORCH_CHECK(bases.dim() == 4, "roi_blend: bases must be (N, K, H, W), got ", bases.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "roi_blend: rois must be (n, 5), got ", rois.sizes());
  TORCH_CHECK(attention.dim() == 4 && attention.size(2) == attention.size(3),
              "roi_blend: attention must be (n, K, M, M), got ", attention.sizes());
  TORCH_CHECK(attention.size(0) == rois.size(0), "roi_blend: ", rois.size(0), " rois but ",
              attention.size(0), " attention maps");
  TORCH_CHECK(attention.size(1) == bases.size(1), "roi_blend: attention has ", attention.size(1),
              " bases, bases tensor has ", bases.size(1));
  TORCH_CHECK(bases.size(1) >= 1 && bases.size(2) >= 1 && bases.size(3) >= 1 && attention.size(2) >= 1,
              "roi_blend: empty bases or attention: ", bases.sizes(), " ", attention.sizes());
  TORCH_CHECK(out_size >= 1, "roi_blend: out_size must be >= 1, got ", out_size);
  TORCH_CHECK(sampling_ratio >= 0, "roi_blend: sampling_ratio must be >= 0, got ", sampling_ratio);
  TORCH_CHECK(bases.scalar_type() == attention.scalar_type(), "roi_blend: bases (", bases.scalar_type(),
              ") and attention (", attention.scalar_type(), ") dtypes differ");
  TORCH_CHECK(rois.scalar_type() == at::kFloat, "roi_blend: rois must be float32, got ", rois.scalar_type());
  TORCH_CHECK(bases.device() == rois.device() && bases.device() == attention.device(),
              "roi_blend: bases, rois and attention must be on one device");
  if (rois.device().is_cpu()) {  // CUDA rois are not read back (a sync); the kernel writes 0 for them
    const at::Tensor r = rois.contiguous();
    const float* p = r.data_ptr<float>();
    for (int64_t i = 0; i < r.size(0); ++i)
      for (int64_t j = 0; j < 5; ++j)
        TORCH_CHECK(std::isfinite(p[i * 5 + j]), "roi_blend: roi ", i, " has a non-finite ",
                    j == 0 ? "batch index" : "coordinate", " (", p[i * 5 + j], "): rois must be finite "
                    "[batch, x1, y1, x2, y2], got [", p[i * 5], ", ", p[i * 5 + 1], ", ", p[i * 5 + 2], ", ",
                    p[i * 5 + 3], ", ", p[i * 5 + 4], "]");
  }
}

at::Tensor roi_blend_cpu(const at::Tensor& bases_in, const at::Tensor& rois_in, const at::Tensor& attention_in,
                         int64_t out_size, double spatial_scale, int64_t sampling_ratio) {
  check_inputs(bases_in, rois_in, attention_in, out_size, sampling_ratio);
  const at::Tensor bases = bases_in.contiguous();
  const at::Tensor rois = rois_in.contiguous();
  const at::Tensor attention = attention_in.contiguous();
  const int64_t n = rois.size(0), batch = bases.size(0), k = bases.size(1);
  const int64_t h = bases.size(2), w = bases.size(3), m = attention.size(2), r = out_size;
  at::Tensor out = at::empty({n, r, r}, bases.options());
  if (n == 0) return out;

  const float* roi_ptr = rois.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {  // fail loudly on a bad batch index (the CUDA path writes 0)
    const float b = roi_ptr[i * 5];
    TORCH_CHECK(b >= 0 && b < static_cast<float>(batch), "roi_blend: roi ", i, " has batch index ", b,
                " but bases has batch ", batch);
  }
  const float scale = static_cast<float>(spatial_scale);
  // attention upsampling taps are the same for every instance (and for rows and columns)
  std::vector<AxisTap> up(r);
  for (int64_t o = 0; o < r; ++o) up[o] = upsample_tap(static_cast<int>(o), static_cast<int>(m), static_cast<int>(r));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bases.scalar_type(), "roi_blend_cpu", [&] {
    const scalar_t* base_ptr = bases.data_ptr<scalar_t>();
    const scalar_t* attn_ptr = attention.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      InstanceScratch ws(k, m, r);
      for (int64_t i = begin; i < end; ++i) {
        const float* roi = roi_ptr + i * 5;
        const RoiGeom g = roi_geometry(static_cast<int>(roi[0]), roi[1], roi[2], roi[3], roi[4], scale,
                                       static_cast<int>(r), static_cast<int>(sampling_ratio));
        blend_instance(base_ptr + static_cast<int64_t>(g.batch) * k * h * w, attn_ptr + i * k * m * m,
                       out_ptr + i * r * r, g, up, ws, k, h, w, m, r);
      }
    });
  });
  return out;
}

}  // namespace roi_blend
}  // namespace sepsnet
