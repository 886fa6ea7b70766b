// Fused ROIAlign + attention blend (SE-PSNet paper Eq. 3, BlendMask blender): the one shared
// definition used by the CPU op, the CUDA kernel and the TensorRT plugin.
//
// For instance i with box (x1, y1, x2, y2) in input pixels on batch image b and output pixel
// (ph, pw) of an R x R mask:
//   crop_k  = ROIAlign(bases[b, k], box) at (ph, pw)   torchvision roi_align, aligned=True
//   a_k     = bilinear upsample of attention[i, k] (M x M -> R x R), align_corners=False
//   out     = sum_k softmax_k(a) * crop_k
// Everything is computed in fp32 whatever the storage type T (float, __half, at::Half).
//
// Conventions follow the reference kernels exactly:
// * ROIAlign (torchvision, aligned=True): start = x1 * scale - 0.5, bin = (x2 - x1) * scale / R,
//   sample grid = sampling_ratio (> 0) or ceil(bin) per axis, mean over max(grid_h * grid_w, 1)
//   samples; a sample with y < -1 or y > H (x likewise) contributes 0, otherwise coordinates
//   below 0 clamp to 0 and the high neighbour clamps to size - 1.
// * Upsampling (torch.nn.functional.interpolate bilinear, align_corners=False, size given):
//   src = (dst + 0.5) * (in / out) - 0.5, clamped at 0; the high neighbour stays inside.
// * Non-finite input (NaN/Inf box coordinates, or geometry that overflows float) never reaches a
//   float -> int conversion (undefined behaviour): such a roi gets an empty sample grid, so its
//   crops and its output are 0; a NaN/Inf sample position is an invalid (zero) sample. The CPU op
//   rejects non-finite rois before this; the CUDA kernel and the TensorRT plugin cannot raise.
//   sampling_ratio = 0 caps the adaptive grid at kMaxGrid samples per bin and axis.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define SEPSNET_HD __host__ __device__ __forceinline__
#else
#define SEPSNET_HD inline
#endif

namespace sepsnet {
namespace roi_blend {

// Per-instance ROIAlign geometry in feature coordinates.
struct RoiGeom {
  int batch;
  float y0, x0;          // roi start (aligned: minus half a pixel)
  float bin_h, bin_w;    // bin size
  int grid_h, grid_w;    // samples per bin and axis
  float inv_count;       // 1 / max(grid_h * grid_w, 1)
};

// One interpolation axis: low/high neighbour, their weights, and whether the sample exists.
struct AxisTap {
  int lo, hi;
  float w_lo, w_hi;
  bool valid;
};

template <typename T>
SEPSNET_HD float to_float(T v) { return static_cast<float>(v); }
template <typename T>
SEPSNET_HD T from_float(float v) { return static_cast<T>(v); }
#if defined(__CUDACC__)
// explicit conversions: torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__
SEPSNET_HD float to_float(__half v) { return __half2float(v); }
template <>
SEPSNET_HD __half from_float<__half>(float v) { return __float2half(v); }
#endif

constexpr int kMaxGrid = 1024;  // adaptive samples per bin and axis (torchvision: unbounded)

// True for a finite float (false for NaN and +-Inf); no <cmath> classification needed on device.
SEPSNET_HD bool is_finite(float v) { return fabsf(v) <= 3.402823466e+38f; }

// Adaptive sample count of one axis, ceil(extent / out_size), as an int without UB: 0 for an
// empty/negative/NaN extent (no samples, as torchvision's non-positive count), at most kMaxGrid.
SEPSNET_HD int adaptive_grid(float extent, int out_size) {
  const float n = ceilf(extent / static_cast<float>(out_size));
  if (!(n > 0.f)) return 0;
  return n < static_cast<float>(kMaxGrid) ? static_cast<int>(n) : kMaxGrid;
}

SEPSNET_HD RoiGeom roi_geometry(int batch, float x1, float y1, float x2, float y2,
                                float spatial_scale, int out_size, int sampling_ratio) {
  RoiGeom g;
  g.batch = batch;
  g.x0 = x1 * spatial_scale - 0.5f;
  g.y0 = y1 * spatial_scale - 0.5f;
  const float roi_w = (x2 * spatial_scale - 0.5f) - g.x0;  // aligned: no minimum size
  const float roi_h = (y2 * spatial_scale - 0.5f) - g.y0;
  g.bin_h = roi_h / static_cast<float>(out_size);
  g.bin_w = roi_w / static_cast<float>(out_size);
  if (!(is_finite(g.x0) && is_finite(g.y0) && is_finite(roi_w) && is_finite(roi_h))) {
    // NaN/Inf coordinates: an empty grid, so every crop (and the blend) is 0
    g.x0 = g.y0 = g.bin_h = g.bin_w = 0.f;
    g.grid_h = g.grid_w = 0;
    g.inv_count = 1.f;
    return g;
  }
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(roi_h, out_size);
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(roi_w, out_size);
  const int count = g.grid_h * g.grid_w;
  g.inv_count = 1.0f / static_cast<float>(count > 1 ? count : 1);
  return g;
}

// torchvision's bilinear_interpolate rules for one axis at coordinate c on an axis of `size`.
// An invalid sample (outside [-1, size], or NaN) gets safe in-range taps; callers weigh it 0.
SEPSNET_HD AxisTap roi_tap(float c, int size) {
  AxisTap t;
  t.valid = c >= -1.0f && c <= static_cast<float>(size);  // false for NaN
  if (!t.valid || c <= 0.f) c = 0.f;  // c is in [0, size] before the int conversion
  t.lo = static_cast<int>(c);
  if (t.lo >= size - 1) {
    t.lo = t.hi = size - 1;
    c = static_cast<float>(t.lo);
  } else {
    t.hi = t.lo + 1;
  }
  t.w_hi = c - static_cast<float>(t.lo);
  t.w_lo = 1.f - t.w_hi;
  return t;
}

// PyTorch upsample_bilinear2d (align_corners=False, explicit output size) for one axis.
SEPSNET_HD AxisTap upsample_tap(int dst, int in_size, int out_size) {
  AxisTap t;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int lo = static_cast<int>(floorf(src));
  if (lo > in_size - 1) lo = in_size - 1;
  float l1 = src - static_cast<float>(lo);
  l1 = l1 < 0.f ? 0.f : (l1 > 1.f ? 1.f : l1);
  t.lo = lo;
  t.hi = lo + (lo < in_size - 1 ? 1 : 0);
  t.w_hi = l1;
  t.w_lo = 1.f - l1;
  t.valid = true;
  return t;
}

// Bilinear value of one plane (row-major, width w) from a y tap and an x tap (torchvision order).
template <typename T>
SEPSNET_HD float sample2d(const T* plane, int w, const AxisTap& ty, const AxisTap& tx) {
  if (!(ty.valid && tx.valid)) return 0.f;
  const float w1 = ty.w_lo * tx.w_lo, w2 = ty.w_lo * tx.w_hi;
  const float w3 = ty.w_hi * tx.w_lo, w4 = ty.w_hi * tx.w_hi;
  return w1 * to_float(plane[ty.lo * w + tx.lo]) + w2 * to_float(plane[ty.lo * w + tx.hi]) +
         w3 * to_float(plane[ty.hi * w + tx.lo]) + w4 * to_float(plane[ty.hi * w + tx.hi]);
}

// Upsampled attention logit of one plane (M x M) at output pixel (ph, pw) of R x R (PyTorch order).
template <typename T>
SEPSNET_HD float attention_at(const T* plane, int m, const AxisTap& ty, const AxisTap& tx) {
  const float top = tx.w_lo * to_float(plane[ty.lo * m + tx.lo]) + tx.w_hi * to_float(plane[ty.lo * m + tx.hi]);
  const float bot = tx.w_lo * to_float(plane[ty.hi * m + tx.lo]) + tx.w_hi * to_float(plane[ty.hi * m + tx.hi]);
  return ty.w_lo * top + ty.w_hi * bot;
}

// ROIAlign value of one base plane (H x W) at output bin (ph, pw).
template <typename T>
SEPSNET_HD float roi_align_at(const T* plane, int height, int width, const RoiGeom& g, int ph, int pw) {
  float acc = 0.f;
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const float y = g.y0 + ph * g.bin_h + (iy + 0.5f) * g.bin_h / static_cast<float>(g.grid_h);
    const AxisTap ty = roi_tap(y, height);
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const float x = g.x0 + pw * g.bin_w + (ix + 0.5f) * g.bin_w / static_cast<float>(g.grid_w);
      acc += sample2d(plane, width, ty, roi_tap(x, width));
    }
  }
  return acc * g.inv_count;
}

// The fused blend of one output pixel. `bases` points at image g.batch (K planes of H x W),
// `attn` at this instance's K planes of M x M. Softmax over K is done online (running max).
template <typename T>
SEPSNET_HD float blend_pixel(const T* bases, const T* attn, int num_bases, int height, int width,
                             int attn_size, int out_size, const RoiGeom& g, int ph, int pw) {
  const AxisTap ay = upsample_tap(ph, attn_size, out_size);
  const AxisTap ax = upsample_tap(pw, attn_size, out_size);
  const int64_t plane = static_cast<int64_t>(height) * width;
  const int aplane = attn_size * attn_size;
  float run_max = -INFINITY, denom = 0.f, numer = 0.f;
  for (int k = 0; k < num_bases; ++k) {
    const float a = attention_at(attn + k * aplane, attn_size, ay, ax);
    const float crop = roi_align_at(bases + k * plane, height, width, g, ph, pw);
    if (a > run_max) {
      const float rescale = expf(run_max - a);  // exp(-inf) = 0 on the first base
      denom = denom * rescale + 1.f;
      numer = numer * rescale + crop;
      run_max = a;
    } else {
      const float e = expf(a - run_max);
      denom += e;
      numer += e * crop;
    }
  }
  return numer / denom;
}

}  // namespace roi_blend
}  // namespace sepsnet
