// CUDA kernel of the fused ROIAlign + attention blend. Torch-free (raw pointers + stream) so the
// PyTorch op and the TensorRT plugin share it. One block per (instance, tile of output pixels),
// one thread per output pixel; fp32 or fp16 storage, fp32 accumulation.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define SEPSNET_WITH_CUDA 1
#include "roi_blend.h"
#include "roi_blend_kernel.cuh"

namespace sepsnet {
namespace roi_blend {
namespace {

constexpr int kThreads = 256;  // output pixels per tile (one block)

__device__ __forceinline__ float load_box(const void* p, int64_t idx, DType t) {
  return t == DType::kFloat16 ? __half2float(static_cast<const __half*>(p)[idx])
                              : static_cast<const float*>(p)[idx];
}

template <typename T>
__global__ void roi_blend_kernel(const T* __restrict__ bases, const void* __restrict__ boxes,
                                 const void* __restrict__ batch_idx, const T* __restrict__ attention,
                                 T* __restrict__ out, LaunchArgs a) {
  const int i = blockIdx.x;  // instance
  const int pix = blockIdx.y * blockDim.x + threadIdx.x;
  const int r = a.out_size;
  if (pix >= r * r) return;
  int b;
  float x1, y1, x2, y2;
  if (a.index_kind == IndexKind::kInRoi) {
    const int64_t o = static_cast<int64_t>(i) * 5;
    const float bf = load_box(boxes, o, a.box);  // range check before the int conversion (NaN: -1)
    b = bf >= 0.f && bf < static_cast<float>(a.batch) ? static_cast<int>(bf) : -1;
    x1 = load_box(boxes, o + 1, a.box);
    y1 = load_box(boxes, o + 2, a.box);
    x2 = load_box(boxes, o + 3, a.box);
    y2 = load_box(boxes, o + 4, a.box);
  } else {
    const int64_t o = static_cast<int64_t>(i) * 4;
    b = a.index_kind == IndexKind::kInt32 ? static_cast<const int32_t*>(batch_idx)[i]
                                          : static_cast<int>(static_cast<const int64_t*>(batch_idx)[i]);
    x1 = load_box(boxes, o, a.box);
    y1 = load_box(boxes, o + 1, a.box);
    x2 = load_box(boxes, o + 2, a.box);
    y2 = load_box(boxes, o + 3, a.box);
  }
  T* dst = out + static_cast<int64_t>(i) * r * r + pix;
  if (b < 0 || b >= a.batch) {  // a bad batch index cannot raise here: write 0 (NaN/Inf boxes: 0 too,
                                // through roi_geometry's empty grid)
    *dst = from_float<T>(0.f);
    return;
  }
  const RoiGeom g = roi_geometry(b, x1, y1, x2, y2, a.spatial_scale, r, a.sampling_ratio);
  const int64_t img = static_cast<int64_t>(b) * a.num_bases * a.height * a.width;
  const int64_t att = static_cast<int64_t>(i) * a.num_bases * a.attn_size * a.attn_size;
  const float v = blend_pixel(bases + img, attention + att, a.num_bases, a.height, a.width, a.attn_size, r, g,
                              pix / r, pix % r);
  *dst = from_float<T>(v);
}

}  // namespace

cudaError_t launch_cuda(const LaunchArgs& a, cudaStream_t stream) {
  if (a.num_rois <= 0) return cudaSuccess;
  if (a.out_size <= 0 || a.num_bases <= 0 || a.attn_size <= 0 || a.height <= 0 || a.width <= 0)
    return cudaErrorInvalidValue;
  const int pixels = a.out_size * a.out_size;
  const dim3 grid(static_cast<unsigned>(a.num_rois), static_cast<unsigned>((pixels + kThreads - 1) / kThreads));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  if (a.data == DType::kFloat16) {
    roi_blend_kernel<__half><<<grid, kThreads, 0, stream>>>(
        static_cast<const __half*>(a.bases), a.boxes, a.batch_idx, static_cast<const __half*>(a.attention),
        static_cast<__half*>(a.out), a);
  } else {
    roi_blend_kernel<float><<<grid, kThreads, 0, stream>>>(
        static_cast<const float*>(a.bases), a.boxes, a.batch_idx, static_cast<const float*>(a.attention),
        static_cast<float*>(a.out), a);
  }
  return cudaGetLastError();
}

}  // namespace roi_blend
}  // namespace sepsnet
