// TensorRT plugin SEPSNetRoiBlend (IPluginV3 with IPluginV3OneCore/Build/Runtime) and its
// creator (IPluginCreatorV3One): the fused ROIAlign + attention blend of SE-PSNet (Eq. 3).
//
// Inputs:  0 bases     (N, K, H, W)  float32 | float16
//          1 boxes     (n, 4)        float32 only, [x1, y1, x2, y2] in input pixels (never rounded to fp16)
//          2 batch_idx (n)           int32 | int64
//          3 attention (n, K, M, M)  same type as bases (logits)
// Output:  0 masks     (n, R, R)     same type as bases (mask logits), n dynamic.
// Attributes: out_size (R, int), spatial_scale (float), sampling_ratio (int, 0 = adaptive),
//             num_bases (int, 0 = take K from the inputs); checked strictly by validate().
// Messages go to TensorRT's logger (setLoggerFinder); the creator is registered only through the
// exported getCreators (IPluginRegistry::loadLibrary). See ../README.md "TensorRT plugin".
// Written against the TensorRT 10 and 11 headers (NvInferRuntime.h).
#pragma once

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace sepsnet {
namespace trt {

constexpr char const* kPluginName = "SEPSNetRoiBlend";
constexpr char const* kPluginVersion = "1";

struct RoiBlendParams {
  int32_t out_size = 56;
  float spatial_scale = 0.25f;
  int32_t sampling_ratio = 1;
  int32_t num_bases = 0;
};

class RoiBlendPlugin : public nvinfer1::IPluginV3,
                       public nvinfer1::IPluginV3OneCore,
                       public nvinfer1::IPluginV3OneBuild,
                       public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit RoiBlendPlugin(RoiBlendParams params, std::string ns = "");
  ~RoiBlendPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return mNamespace.c_str(); }

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override { return 1; }
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override {
    return 0;
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  RoiBlendParams const& params() const { return mParams; }

 private:
  bool checkShapes(nvinfer1::Dims const& bases, nvinfer1::Dims const& boxes, nvinfer1::Dims const& idx,
                   nvinfer1::Dims const& attention) const noexcept;

  RoiBlendParams mParams;
  std::string mNamespace;
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

// Fill ``params`` from plugin fields (ONNX attributes at build time, getFieldsToSerialize at load time):
// known names only, exactly one value each, integer fields int32/int64, spatial_scale float32/float64,
// values in range. False with ``error`` naming the attribute otherwise.
bool validate(nvinfer1::PluginFieldCollection const* fc, RoiBlendParams& params, std::string& error) noexcept;

// Keep the ILoggerFinder TensorRT passes to the library's exported setLoggerFinder (first non-null one).
void setLoggerFinderImpl(nvinfer1::ILoggerFinder* finder) noexcept;

class RoiBlendPluginCreator : public nvinfer1::IPluginCreatorV3One {
 public:
  RoiBlendPluginCreator();
  ~RoiBlendPluginCreator() override = default;

  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return mNamespace.c_str(); }
  void setPluginNamespace(char const* ns) noexcept { mNamespace = ns ? ns : ""; }

 private:
  std::string mNamespace;
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace trt
}  // namespace sepsnet
