// Torch-free checks of the shared kernel core (roi_blend_kernel.cuh), built by CMake as
// roi_blend_selftest: constant bases blend to the constant (softmax weights sum to 1), a box
// outside the image gives 0, a ramp base reproduces the aligned=True sample positions, and
// NaN/Inf box coordinates give 0 without undefined behaviour.
#include <cmath>
#include <cstdio>
#include <vector>

#include "roi_blend_kernel.cuh"

using namespace sepsnet::roi_blend;

static int failures = 0;
static void expect_near(float got, float want, const char* what) {
  if (std::fabs(got - want) > 1e-5f) {
    std::printf("FAIL %s: got %.7f want %.7f\n", what, got, want);
    ++failures;
  }
}

int main() {
  const int k = 4, h = 12, w = 20, m = 14, r = 8;
  std::vector<float> attn(k * m * m);
  for (size_t i = 0; i < attn.size(); ++i) attn[i] = std::sin(0.37f * static_cast<float>(i));
  std::vector<float> bases(k * h * w, 2.5f);
  const RoiGeom inside = roi_geometry(0, 8.f, 8.f, 60.f, 40.f, 0.25f, r, 1);
  const RoiGeom outside = roi_geometry(0, 500.f, 500.f, 600.f, 560.f, 0.25f, r, 2);
  for (int ph = 0; ph < r; ++ph)
    for (int pw = 0; pw < r; ++pw) {
      expect_near(blend_pixel(bases.data(), attn.data(), k, h, w, m, r, inside, ph, pw), 2.5f, "constant");
      expect_near(blend_pixel(bases.data(), attn.data(), k, h, w, m, r, outside, ph, pw), 0.f, "outside");
    }
  std::vector<float> ramp(h * w);  // one base, value = x
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) ramp[y * w + x] = static_cast<float>(x);
  const RoiGeom g = roi_geometry(0, 3.f, 2.f, 15.f, 9.f, 1.f, r, 1);
  for (int pw = 0; pw < r; ++pw) {
    const float want = 3.f - 0.5f + (pw + 0.5f) * 12.f / r;  // aligned: half-pixel shift
    expect_near(blend_pixel(ramp.data(), attn.data(), 1, h, w, m, r, g, 3, pw), want, "ramp");
  }
  // NaN/Inf (or overflowing) box coordinates: an empty grid and output 0, with no float -> int
  // conversion of a non-finite value (build with -fsanitize=float-cast-overflow to check)
  const float nan = std::nanf(""), inf = INFINITY;
  const RoiGeom bad[] = {roi_geometry(0, nan, 8.f, 60.f, 40.f, 0.25f, r, 1),
                         roi_geometry(0, 8.f, 8.f, inf, 40.f, 0.25f, r, 0),
                         roi_geometry(0, 8.f, -inf, 60.f, nan, 0.25f, r, 2),
                         roi_geometry(0, -3e38f, 8.f, 3e38f, 40.f, 16.f, r, 0)};  // x * scale overflows
  for (const RoiGeom& g : bad) {
    if (g.grid_h != 0 || g.grid_w != 0) {
      std::printf("FAIL non-finite roi: grid %d x %d, want 0 x 0\n", g.grid_h, g.grid_w);
      ++failures;
    }
    for (int ph = 0; ph < r; ++ph)
      for (int pw = 0; pw < r; ++pw)
        expect_near(blend_pixel(bases.data(), attn.data(), k, h, w, m, r, g, ph, pw), 0.f, "non-finite roi");
  }
  for (float c : {nan, inf, -inf, 1e30f, -1e30f}) {
    const AxisTap t = roi_tap(c, h);
    if (t.valid || t.lo < 0 || t.lo >= h || t.hi < 0 || t.hi >= h) {
      std::printf("FAIL roi_tap(%g): valid %d lo %d hi %d\n", c, t.valid, t.lo, t.hi);
      ++failures;
    }
  }
  const RoiGeom huge = roi_geometry(0, -1e30f, -1e30f, 1e30f, 1e30f, 0.25f, r, 0);  // finite, enormous
  if (huge.grid_h != kMaxGrid || huge.grid_w != kMaxGrid || adaptive_grid(-5.f, r) != 0 ||
      adaptive_grid(2.5f * r, r) != 3) {
    std::printf("FAIL adaptive grid: %d x %d\n", huge.grid_h, huge.grid_w);
    ++failures;
  }
  if (failures) std::printf("roi_blend selftest: %d failures\n", failures);
  else std::printf("roi_blend selftest: ok\n");
  return failures ? 1 : 0;
}
