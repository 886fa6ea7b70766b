// Declarations shared by the PyTorch op (torch_op.cpp, roi_blend_cpu.cpp) and, for the CUDA
// launcher, by the TensorRT plugin. The CUDA launcher is torch-free (raw pointers + stream).
#pragma once

#include <cstdint>

namespace sepsnet {
namespace roi_blend {

// Where each instance's batch index comes from.
enum class IndexKind : int32_t {
  kInRoi = 0,  // rois are (n, 5) [b, x1, y1, x2, y2] in the box dtype
  kInt32 = 1,  // boxes (n, 4) + int32 batch_idx (n)
  kInt64 = 2,  // boxes (n, 4) + int64 batch_idx (n)
};

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1 };

struct LaunchArgs {
  const void* bases = nullptr;      // (N, K, H, W), dtype `data`
  const void* boxes = nullptr;      // (n, box_stride), dtype `box`
  const void* batch_idx = nullptr;  // (n) or nullptr with IndexKind::kInRoi
  const void* attention = nullptr;  // (n, K, M, M), dtype `data`
  void* out = nullptr;              // (n, R, R), dtype `data`
  int32_t num_rois = 0, batch = 0, num_bases = 0, height = 0, width = 0;
  int32_t attn_size = 0, out_size = 0, sampling_ratio = 1;
  float spatial_scale = 0.25f;
  IndexKind index_kind = IndexKind::kInRoi;
  DType data = DType::kFloat32;
  DType box = DType::kFloat32;
};

}  // namespace roi_blend
}  // namespace sepsnet

#if defined(SEPSNET_WITH_CUDA)
#include <cuda_runtime_api.h>
namespace sepsnet {
namespace roi_blend {
// Enqueue the fused kernel on `stream`; returns the launch status (cudaSuccess when fine).
cudaError_t launch_cuda(const LaunchArgs& args, cudaStream_t stream);
}  // namespace roi_blend
}  // namespace sepsnet
#endif
