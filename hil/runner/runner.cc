// kiln-runner: runs a TVM Relax model.so on a board, with no Python there.
//
//   kiln-runner --model model.so --input inputs.bin --shape 3,32,32 [--dtype float32]
//               [--warmup 10] [--threads N] [--outputs 0|1] [--windows N [--window-size M]] [--device cpu|cuda]
//
// inputs.bin holds N raw little-endian samples of `shape` (no batch dim) in `dtype` (float32,
// or the raw int16 audio / uint8 pixels a model with a front end takes); each is run once at
// batch 1 and timed on its own. The result is exactly one JSON object on stdout:
//   {"runner": "kiln-runner 2", "count": N, "output_dim": K, "predictions": [...],
//    "latencies_us": [...], "peak_rss_kb": int, "threads": int|null, "checksum": double,
//    "dtype": "...", "outputs": [[...], ...] (with --outputs 1: every output value, per sample),
//    "windows_us": [...] (with --windows N: N windows of M back-to-back inferences, cycling through
//    the samples, each timed as a whole: its mean per inference, MLPerf Tiny's way)}
// Any error goes to stderr and exits 2; stdout is then left empty (the JSON is assembled in
// memory and printed only after everything succeeded), so a host never parses half a result.
//
//   kiln-runner --rpc-serve PORT --rpc-key KEY [--rpc-host 127.0.0.1] [--threads N]
//
// serves TVM RPC (MetaSchedule measuring candidates on the board, see rpc_server.h): it prints
// "kiln-runner rpc listening on HOST:PORT" once ready (PORT 0: a free port, the line says which)
// and runs until SIGTERM/SIGINT.
//
// Links only libtvm_runtime.so + libtvm_ffi.so (the Relax VM lives in libtvm_runtime.so).
// --device cuda (an x86-cuda board) loads libtvm_runtime_cuda.so from the bundle at run time.

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include "rpc_server.h"

#include <dlfcn.h>
#include <elf.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr const char* kRunnerVersion = "kiln-runner 2";
constexpr int kExitError = 2;
// Values of tvm::runtime::memory::AllocatorType / ThreadGroup::AffinityMode. Those enums sit in
// headers the wheels do not ship, so they are restated here (checked against TVM 0.27 sources).
constexpr int kPooledAllocator = 2;
constexpr int kAffinityBig = 1;

// An error we report ourselves: the message already names the file/arg and what was expected.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string model;
  std::string input;
  std::vector<int64_t> shape;  // without the batch dimension
  int64_t warmup = 10;
  int64_t threads = 0;  // 0: not given, leave TVM's default
  std::string dtype = "float32";
  bool outputs = false;
  int64_t windows = 0;      // 0: no windows
  int64_t window_size = 0;  // 0: the number of samples
  std::string device = "cpu";  // cpu, or cuda: the kernels on GPU 0 (TVM's CUDA runtime, loaded on demand)
};

// The input dtypes a model may take: float32 features, or a front end's raw samples.
DLDataType ParseDtype(const std::string& text) {
  if (text == "float32") return DLDataType{kDLFloat, 32, 1};
  if (text == "int16") return DLDataType{kDLInt, 16, 1};
  if (text == "uint8") return DLDataType{kDLUInt, 8, 1};
  if (text == "int8") return DLDataType{kDLInt, 8, 1};
  throw UsageError("--dtype: expected float32, int16, uint8 or int8, got '" + text + "'");
}

int64_t ParseInt(const std::string& flag, const std::string& text, int64_t min_value) {
  // std::stoll accepts "12abc" and leading spaces; demand the whole string be digits.
  bool ok = !text.empty() && text.size() <= 12;
  for (char c : text) ok = ok && c >= '0' && c <= '9';
  if (!ok) {
    throw UsageError(flag + ": expected " +
                     (min_value >= 1 ? "a positive" : "a non-negative") + " integer, got '" + text +
                     "'");
  }
  int64_t value = std::stoll(text);
  if (value < min_value) {
    throw UsageError(flag + ": expected an integer >= " + std::to_string(min_value) + ", got " +
                     text);
  }
  return value;
}

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> dims;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) dims.push_back(ParseInt("--shape", item, 1));
  if (dims.empty() || text.back() == ',') {
    throw UsageError("--shape: expected comma-separated positive integers such as 3,32,32, got '" +
                     text + "'");
  }
  return dims;
}

Options ParseArgs(int argc, char** argv) {
  Options opt;
  bool have_shape = false;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      throw UsageError(
          "usage: kiln-runner --model model.so --input inputs.bin --shape 3,32,32 "
          "[--dtype float32|int16|uint8|int8] [--warmup 10] [--threads N] [--outputs 0|1] "
          "[--windows N [--window-size M]] [--device cpu|cuda]");
    }
    if (i + 1 >= argc) throw UsageError(flag + ": missing value");
    std::string value = argv[++i];
    if (flag == "--model") {
      opt.model = value;
    } else if (flag == "--input") {
      opt.input = value;
    } else if (flag == "--shape") {
      opt.shape = ParseShape(value);
      have_shape = true;
    } else if (flag == "--warmup") {
      opt.warmup = ParseInt(flag, value, 0);
    } else if (flag == "--threads") {
      opt.threads = ParseInt(flag, value, 1);
    } else if (flag == "--dtype") {
      ParseDtype(value);
      opt.dtype = value;
    } else if (flag == "--windows") {
      opt.windows = ParseInt(flag, value, 1);
    } else if (flag == "--window-size") {
      opt.window_size = ParseInt(flag, value, 1);
    } else if (flag == "--device") {
      if (value != "cpu" && value != "cuda") throw UsageError("--device: expected cpu or cuda, got '" + value + "'");
      opt.device = value;
    } else if (flag == "--outputs") {
      if (value != "0" && value != "1") throw UsageError("--outputs: expected 0 or 1, got '" + value + "'");
      opt.outputs = value == "1";
    } else {
      throw UsageError("unknown argument '" + flag +
                       "' (expected --model, --input, --shape, --dtype, --warmup, --threads, --outputs, --windows, "
                       "--window-size, --device)");
    }
  }
  if (opt.model.empty()) throw UsageError("--model: required (path to a TVM model.so)");
  if (opt.input.empty()) throw UsageError("--input: required (path to raw input samples)");
  if (!have_shape) throw UsageError("--shape: required (sample shape without batch, e.g. 3,32,32)");
  return opt;
}

void RequireRegularFile(const std::string& flag, const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    throw UsageError(flag + ": file not found: " + path + " (" + std::strerror(errno) + ")");
  }
  if (!S_ISREG(st.st_mode)) throw UsageError(flag + ": not a regular file: " + path);
}

// Reads all samples; the file size must be a whole number (>= 1) of samples.
std::vector<char> ReadInputs(const std::string& path, int64_t sample_bytes, const std::string& dtype,
                             int64_t* count) {
  RequireRegularFile("--input", path);
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw UsageError("--input: cannot open " + path);
  const int64_t size = static_cast<int64_t>(in.tellg());
  if (size == 0 || size % sample_bytes != 0) {
    throw UsageError("--input: " + path + " has " + std::to_string(size) +
                     " bytes, expected a non-zero multiple of " + std::to_string(sample_bytes) +
                     " (one " + dtype + " sample of the --shape)");
  }
  *count = size / sample_bytes;
  std::vector<char> data(static_cast<size_t>(size));
  in.seekg(0);
  if (!in.read(reinterpret_cast<char*>(data.data()), size)) {
    throw UsageError("--input: short read from " + path);
  }
  // The file format is little-endian; every board we target is too, so no byte swap.
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "big-endian hosts need a byte swap");
  return data;
}

// Host allocator for the input tensor: 64-byte aligned, as TVM kernels prefer.
struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

ffi::Function RequireFunction(const ffi::Module& mod, const char* name, const std::string& what) {
  ffi::Optional<ffi::Function> f = mod->GetFunction(name);
  if (!f.has_value()) throw UsageError(what + ": has no function '" + name + "'");
  return f.value();
}

// A model.so cross-compiled for another board fails in dlopen() with a misleading "No such
// file"; check the ELF header first so the message says what is actually wrong.
void CheckModelArch(const std::string& path) {
#if defined(__x86_64__)
  const uint16_t want = EM_X86_64;
  const char* want_name = "x86_64";
#elif defined(__aarch64__)
  const uint16_t want = EM_AARCH64;
  const char* want_name = "aarch64";
#else
  return;
#endif
  unsigned char hdr[EI_NIDENT + 4] = {0};
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(hdr), sizeof(hdr));
  if (!f || std::memcmp(hdr, ELFMAG, SELFMAG) != 0) {
    throw UsageError("--model: " + path + " is not an ELF shared library (expected a model.so "
                     "from tvm.relax.build(...).export_library)");
  }
  const uint16_t machine = static_cast<uint16_t>(hdr[EI_NIDENT + 2] | (hdr[EI_NIDENT + 3] << 8));
  if (machine != want) {
    std::string got = machine == EM_X86_64    ? "x86_64"
                      : machine == EM_AARCH64 ? "aarch64"
                      : machine == EM_ARM     ? "arm"
                      : machine == EM_RISCV   ? "riscv"
                                              : "ELF machine " + std::to_string(machine);
    throw UsageError("--model: " + path + " is built for " + got + ", expected " + want_name +
                     ": was it compiled for another board?");
  }
}

// The library module and the VM made from it; both are kept alive for the whole run since the
// VM's kernels and the tensors it returns live in the library's code.
struct LoadedModel {
  ffi::Module lib;
  ffi::Module vm;
};

// --device cuda: TVM's CUDA runtime (libtvm_runtime_cuda.so, beside this program in the bundle)
// is loaded here rather than linked, so that the one runner binary starts on machines without a
// GPU driver; a machine without a GPU (no libcuda.so.1, or no device 0) is one clear error.
void RequireCuda() {
  std::string dir = ".";
  char exe[4096];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n > 0) {
    exe[n] = '\0';
    std::string path(exe);
    dir = path.substr(0, path.rfind('/'));
  }
  const std::string lib = dir + "/libtvm_runtime_cuda.so";
  if (dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    throw UsageError(std::string("--device cuda: no CUDA device: cannot load TVM's CUDA runtime ") + lib +
                     " (" + (why ? why : "unknown") + "; a GPU driver provides libcuda.so.1)");
  }
  constexpr int kExist = 0;  // tvm::runtime::DeviceAttrKind::kExist
  ffi::Any exist = ffi::Function::GetGlobalRequired("runtime.GetDeviceAttr")(static_cast<int>(kDLCUDA), 0, kExist);
  if (exist.cast<int64_t>() == 0) {
    throw UsageError("--device cuda: no CUDA device: the CUDA runtime loaded but found no GPU 0 "
                     "(cudaGetDeviceCount found none, or the driver is older than the runtime)");
  }
}

LoadedModel LoadModel(const std::string& path, DLDeviceType device) {
  // dlopen() treats a name without '/' as a library to look up on the search path, not a file in
  // the working directory, so hand TVM an absolute path.
  char* resolved = realpath(path.c_str(), nullptr);
  if (resolved == nullptr) throw UsageError("--model: cannot resolve path " + path);
  std::string abs_path(resolved);
  std::free(resolved);
  CheckModelArch(abs_path);
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(abs_path);
    ffi::Module vm =
        RequireFunction(lib, "vm_load_executable", "--model " + path)().cast<ffi::Module>();
    // (device_type, device_id, allocator) for the device, then the same for the host.
    RequireFunction(vm, "vm_initialization", "--model " + path)(
        static_cast<int>(device), 0, kPooledAllocator, static_cast<int>(kDLCPU), 0,
        kPooledAllocator);
    return LoadedModel{lib, vm};
  } catch (const ffi::Error& e) {
    throw UsageError("--model: cannot load " + path + " as a TVM Relax executable: " + e.kind() +
                     ": " + e.message());
  }
}

// Thread count must be fixed before TVM's (lazily created, thread-local) pool exists.
// TVM_NUM_THREADS caps the pool size; config_threadpool(kBig, N) then uses exactly N workers
// (the default kBig mode would silently use only min(N, #big cores)). We read it back.
int64_t ConfigureThreads(int64_t threads) {
  setenv("TVM_NUM_THREADS", std::to_string(threads).c_str(), /*overwrite=*/1);
  ffi::Function::GetGlobalRequired("runtime.config_threadpool")(kAffinityBig,
                                                                static_cast<int>(threads));
  int64_t actual = ffi::Function::GetGlobalRequired("runtime.NumThreads")().cast<int64_t>();
  if (actual != threads) {
    throw UsageError("--threads: asked for " + std::to_string(threads) +
                     " threads, TVM's thread pool uses " + std::to_string(actual));
  }
  return actual;
}

// Extracts the logits tensor from main's result: a Tensor, or a tuple whose first item is one.
ffi::Tensor OutputTensor(const ffi::Any& result) {
  if (auto t = result.as<ffi::Tensor>()) return t.value();
  if (auto arr = result.as<ffi::Array<ffi::Any>>()) {
    if (arr.value().size() >= 1) {
      if (auto t = arr.value()[0].as<ffi::Tensor>()) return t.value();
    }
  }
  throw UsageError("--model: main returned " + result.GetTypeKey() +
                   ", expected a float32 tensor of shape (1,K)");
}

int64_t PeakRssKb() {
  // VmHWM is the peak resident set; under qemu-user it is qemu's own, which includes the guest.
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoll(line.c_str() + 6, nullptr, 10);
  }
  struct rusage ru;  // fallback when /proc lacks VmHWM: ru_maxrss is in kB on Linux
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_maxrss);
}

std::string JsonDouble(double v, const char* fmt) {
  if (!std::isfinite(v)) return "null";  // JSON has no NaN/Infinity
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, v);
  return buf;
}

std::string Run(const Options& opt) {
  int64_t sample_elems = 1;
  for (int64_t d : opt.shape) {
    if (sample_elems > (int64_t{1} << 40) / d) throw UsageError("--shape: too large");
    sample_elems *= d;
  }
  int64_t count = 0;
  const DLDataType in_dtype = ParseDtype(opt.dtype);
  const int64_t sample_bytes = sample_elems * in_dtype.bits / 8;
  std::vector<char> inputs = ReadInputs(opt.input, sample_bytes, opt.dtype, &count);
  RequireRegularFile("--model", opt.model);

  int64_t threads = opt.threads > 0 ? ConfigureThreads(opt.threads) : 0;

  const bool cuda = opt.device == "cuda";
  if (cuda) RequireCuda();
  LoadedModel model = LoadModel(opt.model, cuda ? kDLCUDA : kDLCPU);
  ffi::Function main_fn = RequireFunction(model.vm, "main", "--model " + opt.model);

  std::vector<int64_t> in_shape{1};
  in_shape.insert(in_shape.end(), opt.shape.begin(), opt.shape.end());
  ffi::Tensor input =
      ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(in_shape.data(), in_shape.size()),
                               in_dtype, DLDevice{kDLCPU, 0});
  ffi::Function copy_from_bytes, copy_to_bytes;  // host <-> GPU copies (TVM's device API)
  if (cuda) {
    copy_from_bytes = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromBytes");
    copy_to_bytes = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyToBytes");
    input = ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope")(
                ffi::Shape(in_shape), in_dtype, DLDevice{kDLCUDA, 0}, ffi::Optional<ffi::String>())
                .cast<ffi::Tensor>();
  }
  auto load_sample = [&](int64_t i) {
    if (cuda) {
      copy_from_bytes(input, static_cast<void*>(inputs.data() + i * sample_bytes), sample_bytes);
    } else {
      std::memcpy(input.data_ptr(), inputs.data() + i * sample_bytes, sample_bytes);
    }
  };

  // One inference: call main and copy the logits out. Both are inside the timed region.
  std::vector<float> logits;
  auto infer = [&]() {
    ffi::Any result = main_fn(input);
    ffi::Tensor out = OutputTensor(result);
    DLDataType dt = out.dtype();
    if (dt.code != kDLFloat || dt.bits != 32 || dt.lanes != 1 ||
        out.device().device_type != (cuda ? kDLCUDA : kDLCPU)) {
      throw UsageError(std::string("--model: main returned a tensor that is not float32 on ") + (cuda ? "CUDA" : "CPU"));
    }
    if (cuda) {  // the logits back to the host (a synchronizing copy: the GPU's work is inside the timing)
      logits.resize(out.numel());
      copy_to_bytes(out, static_cast<void*>(logits.data()), static_cast<int64_t>(out.numel() * sizeof(float)));
      return;
    }
    // VM results are compact, so the (1,K) logits are numel() consecutive floats.
    const char* base = static_cast<const char*>(out.data_ptr()) + out.byte_offset();
    const float* p = reinterpret_cast<const float*>(base);
    logits.assign(p, p + out.numel());
  };

  std::vector<int64_t> predictions;
  std::vector<float> all_outputs;  // with --outputs: every value, sample after sample
  std::vector<double> latencies_us;
  std::vector<double> windows_us;
  double checksum = 0.0;
  int64_t output_dim = -1;
  try {
    load_sample(0);
    for (int64_t w = 0; w < opt.warmup; ++w) infer();
    for (int64_t i = 0; i < count; ++i) {
      load_sample(i);
      auto t0 = std::chrono::steady_clock::now();
      infer();
      auto t1 = std::chrono::steady_clock::now();
      latencies_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      int64_t k = static_cast<int64_t>(logits.size());
      if (k == 0) throw UsageError("--model: main returned an empty tensor, expected (1,K)");
      if (output_dim >= 0 && k != output_dim) {
        throw UsageError("--model: output of sample " + std::to_string(i) + " has " +
                         std::to_string(k) + " values, expected " + std::to_string(output_dim));
      }
      output_dim = k;
      if (opt.outputs) all_outputs.insert(all_outputs.end(), logits.begin(), logits.end());
      int64_t best = 0;  // first maximum, like numpy/torch argmax
      for (int64_t j = 0; j < k; ++j) {
        checksum += static_cast<double>(logits[j]);
        if (logits[j] > logits[best]) best = j;
      }
      predictions.push_back(best);
    }
    const int64_t size = opt.window_size > 0 ? opt.window_size : count;
    for (int64_t w = 0; w < opt.windows; ++w) {
      auto t0 = std::chrono::steady_clock::now();
      for (int64_t j = 0; j < size; ++j) {
        load_sample(j % count);
        infer();
      }
      auto t1 = std::chrono::steady_clock::now();
      windows_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count() / size);
    }
  } catch (const ffi::Error& e) {
    std::string shape = "(1";
    for (int64_t d : opt.shape) shape += "," + std::to_string(d);
    throw UsageError("--model: running main of " + opt.model + " on input shape " + shape +
                     ") failed: " + e.kind() + ": " + e.message());
  }

  std::ostringstream js;
  js << "{\"runner\": \"" << kRunnerVersion << "\", \"count\": " << count
     << ", \"output_dim\": " << output_dim << ", \"predictions\": [";
  for (size_t i = 0; i < predictions.size(); ++i) js << (i ? ", " : "") << predictions[i];
  js << "], \"latencies_us\": [";
  for (size_t i = 0; i < latencies_us.size(); ++i) {
    js << (i ? ", " : "") << JsonDouble(latencies_us[i], "%.3f");
  }
  js << "], \"peak_rss_kb\": " << PeakRssKb() << ", \"threads\": ";
  if (threads > 0) {
    js << threads;
  } else {
    js << "null";
  }
  js << ", \"checksum\": " << JsonDouble(checksum, "%.17g") << ", \"dtype\": \"" << opt.dtype << "\"";
  if (opt.windows > 0) {
    js << ", \"windows_us\": [";
    for (size_t i = 0; i < windows_us.size(); ++i) js << (i ? ", " : "") << JsonDouble(windows_us[i], "%.3f");
    js << "]";
  }
  if (opt.outputs) {
    js << ", \"outputs\": [";
    for (int64_t i = 0; i < count; ++i) {
      js << (i ? ", [" : "[");
      for (int64_t j = 0; j < output_dim; ++j) {
        js << (j ? ", " : "") << JsonDouble(all_outputs[i * output_dim + j], "%.9g");
      }
      js << "]";
    }
    js << "]";
  }
  js << "}\n";
  return js.str();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "--rpc-serve") return kiln::RpcServeMain(argc, argv);
  std::string out;
  try {
    out = Run(ParseArgs(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "kiln-runner: error: " << e.what() << std::endl;
    return kExitError;
  } catch (const ffi::Error& e) {
    std::cerr << "kiln-runner: error: TVM " << e.kind() << ": " << e.message() << std::endl;
    return kExitError;
  } catch (const std::exception& e) {
    std::cerr << "kiln-runner: error: " << e.what() << std::endl;
    return kExitError;
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    std::cerr << "kiln-runner: error: writing the result to stdout failed" << std::endl;
    return kExitError;
  }
  return 0;
}
