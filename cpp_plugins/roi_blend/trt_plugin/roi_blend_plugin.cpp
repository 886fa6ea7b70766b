// SEPSNetRoiBlend TensorRT plugin: shapes, types, attribute (de)serialisation and enqueue of the
// shared CUDA kernel (../roi_blend_cuda.cu). See roi_blend_plugin.h for the tensor contract.
#include "roi_blend_plugin.h"

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>

#ifndef SEPSNET_WITH_CUDA
#define SEPSNET_WITH_CUDA 1
#endif
#include "../roi_blend.h"

using namespace nvinfer1;

namespace sepsnet {
namespace trt {
namespace {

constexpr int32_t kBases = 0, kBoxes = 1, kBatchIdx = 2, kAttention = 3, kNbInputs = 4, kNbOutputs = 1;

// The ILoggerFinder TensorRT hands the library (IPluginRegistry::loadLibrary / a version-compatible
// plan call the exported setLoggerFinder); kept once, read under a mutex.
std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder = nullptr;

ILogger* pluginLogger() noexcept {
  std::lock_guard<std::mutex> lock(gLoggerMutex);
  if (gLoggerFinder != nullptr) {
    if (ILogger* logger = gLoggerFinder->findLogger()) return logger;
  }
  return ::getLogger();  // libnvinfer's global logger (used when no finder was given)
}

}  // namespace

void setLoggerFinderImpl(ILoggerFinder* finder) noexcept {
  std::lock_guard<std::mutex> lock(gLoggerMutex);
  if (gLoggerFinder == nullptr && finder != nullptr) gLoggerFinder = finder;
}

namespace {

// Every message goes to TensorRT's logger (the application's ILogger), prefixed with the plugin name;
// stderr only when TensorRT offers no logger at all.
void log(ILogger::Severity severity, std::string const& what) noexcept {
  try {
    std::string const msg = std::string("[") + kPluginName + "] " + what;
    if (ILogger* logger = pluginLogger()) {
      logger->log(severity, msg.c_str());
    } else {
      std::fprintf(stderr, "%s\n", msg.c_str());
    }
  } catch (...) {
  }
}

void report(std::string const& what) noexcept { log(ILogger::Severity::kERROR, what); }

bool isFloatType(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF; }

// Integer fields arrive as kINT32 (plugin serialisation) or kINT64 (ONNX attributes are int64); the
// one float field as kFLOAT32 or kFLOAT64. Anything else (a float for an int, an int for the float, a
// length other than 1, a null pointer) is refused: no silent conversion.
bool readInt(PluginField const& f, int32_t& out, std::string& error) {
  int64_t value = 0;
  if (f.type == PluginFieldType::kINT32) {
    value = *static_cast<int32_t const*>(f.data);
  } else if (f.type == PluginFieldType::kINT64) {
    value = *static_cast<int64_t const*>(f.data);
  } else {
    error = std::string("attribute '") + f.name + "' must be an integer (int32/int64 plugin field), got field type " +
            std::to_string(static_cast<int32_t>(f.type));
    return false;
  }
  if (value < INT32_MIN || value > INT32_MAX) {
    error = std::string("attribute '") + f.name + "' = " + std::to_string(value) + " does not fit int32";
    return false;
  }
  out = static_cast<int32_t>(value);
  return true;
}

bool readFloat(PluginField const& f, float& out, std::string& error) {
  double value = 0.0;
  if (f.type == PluginFieldType::kFLOAT32) {
    value = *static_cast<float const*>(f.data);
  } else if (f.type == PluginFieldType::kFLOAT64) {
    value = *static_cast<double const*>(f.data);
  } else {
    error = std::string("attribute '") + f.name + "' must be a float (float32/float64 plugin field), got field type " +
            std::to_string(static_cast<int32_t>(f.type));
    return false;
  }
  if (!std::isfinite(value)) {
    error = std::string("attribute '") + f.name + "' is not finite";
    return false;
  }
  out = static_cast<float>(value);
  return true;
}

}  // namespace

bool validate(PluginFieldCollection const* fc, RoiBlendParams& p, std::string& error) noexcept {
  try {
    p = RoiBlendParams{};
    bool seen[4] = {false, false, false, false};
    char const* const names[4] = {"out_size", "spatial_scale", "sampling_ratio", "num_bases"};
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      if (f.name == nullptr) {
        error = "a plugin field has no name";
        return false;
      }
      int32_t k = 0;
      while (k < 4 && std::strcmp(f.name, names[k]) != 0) ++k;
      if (k == 4) {  // e.g. attributes a newer exporter adds: not ours to interpret
        log(ILogger::Severity::kWARNING, std::string("ignoring unknown attribute '") + f.name + "'");
        continue;
      }
      if (seen[k]) {
        error = std::string("attribute '") + f.name + "' is given twice";
        return false;
      }
      seen[k] = true;
      if (f.data == nullptr || f.length != 1) {
        error = std::string("attribute '") + f.name + "' must hold exactly one value, got " +
                std::to_string(f.length);
        return false;
      }
      bool const ok = k == 1 ? readFloat(f, p.spatial_scale, error)
                             : readInt(f, k == 0 ? p.out_size : (k == 2 ? p.sampling_ratio : p.num_bases), error);
      if (!ok) return false;
    }
    if (p.out_size < 1 || p.out_size > 1024) {
      error = "attribute 'out_size' must be in [1, 1024], got " + std::to_string(p.out_size);
    } else if (!(p.spatial_scale > 0.f)) {
      error = "attribute 'spatial_scale' must be > 0, got " + std::to_string(p.spatial_scale);
    } else if (p.sampling_ratio < 0) {
      error = "attribute 'sampling_ratio' must be >= 0 (0 = adaptive), got " + std::to_string(p.sampling_ratio);
    } else if (p.num_bases < 0) {
      error = "attribute 'num_bases' must be >= 0 (0 = from the inputs), got " + std::to_string(p.num_bases);
    } else {
      return true;
    }
    return false;
  } catch (std::exception const& e) {
    error = e.what();
    return false;
  }
}

namespace {

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
    case kBoxes: return d.type == DataType::kFLOAT;  // never fp16: box coordinates are not rounded
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
  a.box = roi_blend::DType::kFloat32;  // supportsFormatCombination admits fp32 boxes only
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

IPluginV3* RoiBlendPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc,
                                               TensorRTPhase /*phase*/) noexcept {
  try {
    RoiBlendParams p;
    std::string error;
    if (!validate(fc, p, error)) {
      report(std::string("layer '") + (name ? name : "?") + "': " + error);
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
// One path only: TensorRT 10/11 load IPluginV3 libraries with IPluginRegistry::loadLibrary (Python
// IPluginRegistry.load_library, trtexec --dynamicPlugins, version-compatible plans carrying the library),
// which calls setLoggerFinder and registers what getCreators returns. A load-time static registration
// (REGISTER_TENSORRT_PLUGIN) as well would register the creator twice, and loadLibrary refuses a library
// whose creators are already registered.
extern "C" {
__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  sepsnet::trt::setLoggerFinderImpl(finder);
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static sepsnet::trt::RoiBlendPluginCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
}
