// SEPSNetRoiBlend TensorRT plugin: shapes, types, attribute (de)serialisation and enqueue of the
// shared CUDA kernel (../roi_blend_cuda.cu). See roi_blend_plugin.h for the tensor contract.
#include "roi_blend_plugin.h"

#include <cstdio>
#include <cstring>
#include <exception>

#ifndef SEPSNET_WITH_CUDA
#define SEPSNET_WITH_CUDA 1
#endif
#include "../roi_blend.h"

using namespace nvinfer1;

namespace sepsnet {
namespace trt {
namespace {

constexpr int32_t kBases = 0, kBoxes = 1, kBatchIdx = 2, kAttention = 3, kNbInputs = 4, kNbOutputs = 1;

void report(char const* what) noexcept { std::fprintf(stderr, "[SEPSNetRoiBlend] %s\n", what); }

bool isFloatType(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF; }

// Read an int attribute that the ONNX parser may hand over as int32 or int64 (or a float).
bool readInt(PluginField const& f, int32_t& out) {
  if (f.data == nullptr || f.length < 1) return false;
  switch (f.type) {
    case PluginFieldType::kINT32: out = *static_cast<int32_t const*>(f.data); return true;
    case PluginFieldType::kINT64: out = static_cast<int32_t>(*static_cast<int64_t const*>(f.data)); return true;
    case PluginFieldType::kFLOAT32: out = static_cast<int32_t>(*static_cast<float const*>(f.data)); return true;
    default: return false;
  }
}

bool readFloat(PluginField const& f, float& out) {
  if (f.data == nullptr || f.length < 1) return false;
  switch (f.type) {
    case PluginFieldType::kFLOAT32: out = *static_cast<float const*>(f.data); return true;
    case PluginFieldType::kFLOAT64: out = static_cast<float>(*static_cast<double const*>(f.data)); return true;
    case PluginFieldType::kINT32: out = static_cast<float>(*static_cast<int32_t const*>(f.data)); return true;
    default: return false;
  }
}

void describeFields(RoiBlendParams const* p, std::vector<PluginField>& fields, PluginFieldCollection& fc) {
  fields.clear();
  fields.emplace_back("out_size", p ? &p->out_size : nullptr, PluginFieldType::kINT32, 1);
  fields.emplace_back("spatial_scale", p ? &p->spatial_scale : nullptr, PluginFieldType::kFLOAT32, 1);
  fields.emplace_back("sampling_ratio", p ? &p->sampling_ratio : nullptr, PluginFieldType::kINT32, 1);
  fields.emplace_back("num_bases", p ? &p->num_bases : nullptr, PluginFieldType::kINT32, 1);
  fc.nbFields = static_cast<int32_t>(fields.size());
  fc.fields = fields.data();
}

}  // namespace

RoiBlendPlugin::RoiBlendPlugin(RoiBlendParams params, std::string ns) : mParams(params), mNamespace(std::move(ns)) {}

IPluginCapability* RoiBlendPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
  }
  return nullptr;
}

IPluginV3* RoiBlendPlugin::clone() noexcept {
  try {
    return new RoiBlendPlugin(mParams, mNamespace);
  } catch (std::exception const& e) {
    report(e.what());
  }
  return nullptr;
}

bool RoiBlendPlugin::checkShapes(Dims const& bases, Dims const& boxes, Dims const& idx,
                                 Dims const& attention) const noexcept {
  // -1 (unknown at build time) passes; known sizes must agree
  auto eq = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; };
  if (bases.nbDims != 4 || boxes.nbDims != 2 || idx.nbDims != 1 || attention.nbDims != 4) {
    report("expected bases (N,K,H,W), boxes (n,4), batch_idx (n), attention (n,K,M,M)");
    return false;
  }
  if (!eq(boxes.d[1], 4) || !eq(boxes.d[0], idx.d[0]) || !eq(boxes.d[0], attention.d[0]) ||
      !eq(bases.d[1], attention.d[1]) || !eq(attention.d[2], attention.d[3]) ||
      (mParams.num_bases > 0 && !eq(bases.d[1], mParams.num_bases))) {
    report("inconsistent input shapes (n, K or M differ between inputs, or K != num_bases)");
    return false;
  }
  return true;
}

int32_t RoiBlendPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                        DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
  return checkShapes(in[kBases].desc.dims, in[kBoxes].desc.dims, in[kBatchIdx].desc.dims, in[kAttention].desc.dims)
             ? 0
             : -1;
}

int32_t RoiBlendPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                           int32_t nbInputs) const noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
  outputTypes[0] = inputTypes[kBases];
  return 0;
}

int32_t RoiBlendPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                                        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                                        IExprBuilder& exprBuilder) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[kBoxes].nbDims != 2) return -1;
  outputs[0].nbDims = 3;
  outputs[0].d[0] = inputs[kBoxes].d[0];  // dynamic instance count
  outputs[0].d[1] = exprBuilder.constant(mParams.out_size);
  outputs[0].d[2] = exprBuilder.constant(mParams.out_size);
  return 0;
}

bool RoiBlendPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                               int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= nbInputs + nbOutputs) return false;
  PluginTensorDesc const& d = inOut[pos].desc;
  if (d.format != TensorFormat::kLINEAR) return false;
  switch (pos) {
    case kBases: return isFloatType(d.type);
    case kBoxes: return isFloatType(d.type);
    case kBatchIdx: return d.type == DataType::kINT32 || d.type == DataType::kINT64;
    default: return d.type == inOut[kBases].desc.type;  // attention and the output follow the bases
  }
}

int32_t RoiBlendPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                                      int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
  if (!checkShapes(in[kBases].dims, in[kBoxes].dims, in[kBatchIdx].dims, in[kAttention].dims)) return -1;
  if (out[0].dims.nbDims != 3 || out[0].dims.d[1] != mParams.out_size || out[0].dims.d[2] != mParams.out_size) {
    report("output must be (n, out_size, out_size)");
    return -1;
  }
  return 0;
}

int32_t RoiBlendPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                                void const* const* inputs, void* const* outputs, void* /*workspace*/,
                                cudaStream_t stream) noexcept {
  Dims const& b = inputDesc[kBases].dims;
  Dims const& att = inputDesc[kAttention].dims;
  roi_blend::LaunchArgs a;
  a.num_rois = static_cast<int32_t>(inputDesc[kBoxes].dims.d[0]);
  if (a.num_rois == 0) return 0;
  a.bases = inputs[kBases];
  a.boxes = inputs[kBoxes];
  a.batch_idx = inputs[kBatchIdx];
  a.attention = inputs[kAttention];
  a.out = outputs[0];
  a.batch = static_cast<int32_t>(b.d[0]);
  a.num_bases = static_cast<int32_t>(b.d[1]);
  a.height = static_cast<int32_t>(b.d[2]);
  a.width = static_cast<int32_t>(b.d[3]);
  a.attn_size = static_cast<int32_t>(att.d[2]);
  a.out_size = mParams.out_size;
  a.sampling_ratio = mParams.sampling_ratio;
  a.spatial_scale = mParams.spatial_scale;
  a.index_kind = inputDesc[kBatchIdx].type == DataType::kINT64 ? roi_blend::IndexKind::kInt64
                                                                : roi_blend::IndexKind::kInt32;
  a.data = inputDesc[kBases].type == DataType::kHALF ? roi_blend::DType::kFloat16 : roi_blend::DType::kFloat32;
  a.box = inputDesc[kBoxes].type == DataType::kHALF ? roi_blend::DType::kFloat16 : roi_blend::DType::kFloat32;
  cudaError_t const err = roi_blend::launch_cuda(a, stream);
  if (err != cudaSuccess) {
    report(cudaGetErrorString(err));
    return -1;
  }
  return 0;
}

IPluginV3* RoiBlendPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept { return clone(); }

PluginFieldCollection const* RoiBlendPlugin::getFieldsToSerialize() noexcept {
  describeFields(&mParams, mFields, mFieldCollection);
  return &mFieldCollection;
}

RoiBlendPluginCreator::RoiBlendPluginCreator() { describeFields(nullptr, mFields, mFieldCollection); }

IPluginV3* RoiBlendPluginCreator::createPlugin(char const* /*name*/, PluginFieldCollection const* fc,
                                               TensorRTPhase /*phase*/) noexcept {
  try {
    RoiBlendParams p;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      if (f.name == nullptr) continue;
      bool ok = true;
      if (!std::strcmp(f.name, "out_size")) ok = readInt(f, p.out_size);
      else if (!std::strcmp(f.name, "spatial_scale")) ok = readFloat(f, p.spatial_scale);
      else if (!std::strcmp(f.name, "sampling_ratio")) ok = readInt(f, p.sampling_ratio);
      else if (!std::strcmp(f.name, "num_bases")) ok = readInt(f, p.num_bases);
      if (!ok) {
        report("unreadable attribute (expected int out_size/sampling_ratio/num_bases, float spatial_scale)");
        return nullptr;
      }
    }
    if (p.out_size < 1 || p.sampling_ratio < 0 || p.num_bases < 0 || !(p.spatial_scale > 0.f)) {
      report("invalid attributes: need out_size >= 1, sampling_ratio >= 0, num_bases >= 0, spatial_scale > 0");
      return nullptr;
    }
    return new RoiBlendPlugin(p, mNamespace);
  } catch (std::exception const& e) {
    report(e.what());
  }
  return nullptr;
}

}  // namespace trt
}  // namespace sepsnet

// ---- registration ---------------------------------------------------------------------------
// dlopen (ctypes / trtexec --staticPlugins) registers through REGISTER_TENSORRT_PLUGIN;
// IPluginRegistry::loadLibrary (trtexec --dynamicPlugins) calls getCreators() instead. Build
// with -DSEPSNET_TRT_NO_STATIC_REGISTRATION to use only the latter.
#ifndef SEPSNET_TRT_NO_STATIC_REGISTRATION
using sepsnet::trt::RoiBlendPluginCreator;
REGISTER_TENSORRT_PLUGIN(RoiBlendPluginCreator);
#endif

extern "C" {
__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* /*finder*/) {}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static sepsnet::trt::RoiBlendPluginCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
}
