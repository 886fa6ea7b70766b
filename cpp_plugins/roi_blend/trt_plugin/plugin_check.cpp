// GPU-free check of libsepsnet_plugins.so through its exported interface only, as TensorRT's
// IPluginRegistry::loadLibrary sees it: dlopen, setLoggerFinder, getCreators; then the creator's strict
// attribute validation (messages must reach the logger TensorRT handed over), the type combinations of
// supportsFormatCombination (boxes fp32 only, batch indices int32/int64 only) and the field round trip
// through getFieldsToSerialize. CMake target `roi_blend_plugin_check` (ctest), built with the plugin.
//   roi_blend_plugin_check build/plugins/libsepsnet_plugins.so
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

int gFailures = 0;

void expect(bool ok, char const* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++gFailures;
}

class RecordingLogger : public ILogger {
 public:
  void log(Severity severity, AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kWARNING) messages.emplace_back(msg);
  }
  bool saw(char const* needle) const {
    for (auto const& m : messages)
      if (m.find(needle) != std::string::npos) return true;
    return false;
  }
  std::vector<std::string> messages;
};

class Finder : public ILoggerFinder {
 public:
  explicit Finder(ILogger* logger) : mLogger(logger) {}
  ILogger* findLogger() override { return mLogger; }

 private:
  ILogger* mLogger;
};

PluginTensorDesc desc(DataType type) {
  PluginTensorDesc d{};
  d.type = type;
  d.format = TensorFormat::kLINEAR;
  return d;
}

// inOut for the 4 inputs + 1 output with the given types
bool supports(IPluginV3OneBuild* build, int32_t pos, DataType bases, DataType boxes, DataType idx) {
  DynamicPluginTensorDesc io[5]{};
  io[0].desc = desc(bases);
  io[1].desc = desc(boxes);
  io[2].desc = desc(idx);
  io[3].desc = desc(bases);
  io[4].desc = desc(bases);
  return build->supportsFormatCombination(pos, io, 4, 1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s libsepsnet_plugins.so\n", argv[0]);
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    std::fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
    return 2;
  }
  using SetFinder = void (*)(ILoggerFinder*);
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  auto setFinder = reinterpret_cast<SetFinder>(dlsym(lib, "setLoggerFinder"));
  auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
  expect(setFinder != nullptr && getCreators != nullptr, "exports setLoggerFinder and getCreators");
  if (setFinder == nullptr || getCreators == nullptr) return 1;

  RecordingLogger logger;
  Finder finder(&logger);
  setFinder(&finder);
  int32_t n = 0;
  IPluginCreatorInterface* const* creators = getCreators(n);
  expect(n == 1 && creators != nullptr, "one creator");
  auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
  expect(std::strcmp(creator->getPluginName(), "SEPSNetRoiBlend") == 0 &&
             std::strcmp(creator->getPluginVersion(), "1") == 0,
         "creator SEPSNetRoiBlend version 1");

  // ONNX attributes arrive as int64 / float32 fields
  int64_t outSize = 28, sampling = 2, numBases = 4;
  float scale = 0.25f;
  std::vector<PluginField> good = {{"out_size", &outSize, PluginFieldType::kINT64, 1},
                                   {"spatial_scale", &scale, PluginFieldType::kFLOAT32, 1},
                                   {"sampling_ratio", &sampling, PluginFieldType::kINT64, 1},
                                   {"num_bases", &numBases, PluginFieldType::kINT64, 1}};
  PluginFieldCollection fc{static_cast<int32_t>(good.size()), good.data()};
  IPluginV3* plugin = creator->createPlugin("blend", &fc, TensorRTPhase::kBUILD);
  expect(plugin != nullptr, "int64/float32 attributes accepted");
  if (plugin == nullptr) return 1;

  struct Bad {
    PluginField field;
    char const* needle;
    char const* what;
  };
  float floatSize = 28.f;
  int32_t intScale = 1, negative = -1, pair[2] = {1, 2};
  int64_t huge = int64_t{1} << 40;
  std::vector<Bad> bad = {
      {{"out_size", &floatSize, PluginFieldType::kFLOAT32, 1}, "'out_size' must be an integer", "float out_size"},
      {{"spatial_scale", &intScale, PluginFieldType::kINT32, 1}, "'spatial_scale' must be a float", "int spatial_scale"},
      {{"sampling_ratio", pair, PluginFieldType::kINT32, 2}, "exactly one value", "two values"},
      {{"sampling_ratio", &negative, PluginFieldType::kINT32, 1}, "'sampling_ratio' must be >= 0", "negative ratio"},
      {{"out_size", &huge, PluginFieldType::kINT64, 1}, "does not fit int32", "int64 overflow"},
  };
  for (auto const& b : bad) {
    PluginFieldCollection one{1, &b.field};
    logger.messages.clear();
    IPluginV3* p = creator->createPlugin("blend", &one, TensorRTPhase::kBUILD);
    expect(p == nullptr && logger.saw(b.needle), b.what);
    delete p;
  }
  std::vector<PluginField> twice = {good[0], good[0]};
  PluginFieldCollection dup{2, twice.data()};
  logger.messages.clear();
  expect(creator->createPlugin("blend", &dup, TensorRTPhase::kBUILD) == nullptr && logger.saw("given twice"),
         "repeated attribute refused");

  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  expect(supports(build, 1, DataType::kFLOAT, DataType::kFLOAT, DataType::kINT32), "fp32 boxes");
  expect(!supports(build, 1, DataType::kHALF, DataType::kHALF, DataType::kINT32), "fp16 boxes refused");
  expect(supports(build, 2, DataType::kHALF, DataType::kFLOAT, DataType::kINT64), "int64 batch indices");
  expect(!supports(build, 2, DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT), "float batch indices refused");
  expect(supports(build, 0, DataType::kHALF, DataType::kFLOAT, DataType::kINT32), "fp16 bases");
  // serialised fields (int32/float32) create an equal plugin (the load-time path)
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
  IPluginV3* loaded = creator->createPlugin("blend", saved, TensorRTPhase::kRUNTIME);
  expect(loaded != nullptr, "serialised fields load");
  if (loaded != nullptr) {
    auto* rt2 = static_cast<IPluginV3OneRuntime*>(loaded->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* again = rt2->getFieldsToSerialize();
    bool same = again->nbFields == 4;
    for (int32_t i = 0; same && i < 4; ++i) {
      same = std::strcmp(saved->fields[i].name, again->fields[i].name) == 0 &&
             std::memcmp(saved->fields[i].data, again->fields[i].data, 4) == 0;
    }
    expect(same, "field round trip");
    delete loaded;
  }
  delete plugin;
  std::printf("%s\n", gFailures ? "FAILED" : "all plugin checks passed");
  return gFailures ? 1 : 0;
}
