// PyTorch registration of sepsnet::roi_blend (CPU always, CUDA when built with SEPSNET_WITH_CUDA).
// Inference only: sepsnet/ops/roi_blend.py registers a backward that raises, and its Python
// wrapper falls back to the differentiable unfused blender when gradients are needed.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "roi_blend.h"

#if defined(SEPSNET_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sepsnet {
namespace roi_blend {

void check_inputs(const at::Tensor& bases, const at::Tensor& rois, const at::Tensor& attention,
                  int64_t out_size, int64_t sampling_ratio);
at::Tensor roi_blend_cpu(const at::Tensor& bases, const at::Tensor& rois, const at::Tensor& attention,
                         int64_t out_size, double spatial_scale, int64_t sampling_ratio);

#if defined(SEPSNET_WITH_CUDA)
at::Tensor roi_blend_cuda(const at::Tensor& bases_in, const at::Tensor& rois_in, const at::Tensor& attention_in,
                          int64_t out_size, double spatial_scale, int64_t sampling_ratio) {
  check_inputs(bases_in, rois_in, attention_in, out_size, sampling_ratio);
  TORCH_CHECK(bases_in.scalar_type() == at::kFloat || bases_in.scalar_type() == at::kHalf,
              "roi_blend (CUDA): bases must be float32 or float16, got ", bases_in.scalar_type());
  c10::cuda::CUDAGuard guard(bases_in.device());
  const at::Tensor bases = bases_in.contiguous();
  const at::Tensor rois = rois_in.contiguous();
  const at::Tensor attention = attention_in.contiguous();
  const int64_t n = rois.size(0);
  at::Tensor out = at::empty({n, out_size, out_size}, bases.options());
  if (n == 0) return out;
  LaunchArgs a;
  a.bases = bases.data_ptr();
  a.boxes = rois.data_ptr();
  a.attention = attention.data_ptr();
  a.out = out.data_ptr();
  a.num_rois = static_cast<int32_t>(n);
  a.batch = static_cast<int32_t>(bases.size(0));
  a.num_bases = static_cast<int32_t>(bases.size(1));
  a.height = static_cast<int32_t>(bases.size(2));
  a.width = static_cast<int32_t>(bases.size(3));
  a.attn_size = static_cast<int32_t>(attention.size(2));
  a.out_size = static_cast<int32_t>(out_size);
  a.sampling_ratio = static_cast<int32_t>(sampling_ratio);
  a.spatial_scale = static_cast<float>(spatial_scale);
  a.index_kind = IndexKind::kInRoi;
  a.data = bases.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kFloat32;
  a.box = DType::kFloat32;
  const cudaError_t err = launch_cuda(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "roi_blend (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return out;
}
#endif

}  // namespace roi_blend
}  // namespace sepsnet

TORCH_LIBRARY(sepsnet, m) {
  m.def("roi_blend(Tensor bases, Tensor rois, Tensor attention, int out_size, float spatial_scale, "
        "int sampling_ratio) -> Tensor");
}

TORCH_LIBRARY_IMPL(sepsnet, CPU, m) { m.impl("roi_blend", &sepsnet::roi_blend::roi_blend_cpu); }

#if defined(SEPSNET_WITH_CUDA)
TORCH_LIBRARY_IMPL(sepsnet, CUDA, m) { m.impl("roi_blend", &sepsnet::roi_blend::roi_blend_cuda); }
#endif
