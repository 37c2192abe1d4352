// cuSOLVER batched symmetric eigenvalues, with libcusolver loaded at run time.
//
// tbfast._C is a CPU-only build (no CUDA toolkit, no CUDA headers). This file reaches cuSOLVER
// through dlopen/dlsym (the ABI subset is declared in cusolver_api.h) and reaches the GPU
// through torch only (tbfast_torch.h: the stable interface or ATen/c10):
//   * memory:  new_empty on G's device -> torch's caching allocator, current stream;
//   * stream:  torch's current stream of G's device: c10's device-generic interface
//              (c10::impl::getDeviceGuardImpl(CUDA)->getStream(device), then
//              c10::Stream::native_handle()) in the regular build; the C shim's
//              aoti_torch_get_current_cuda_stream (looked up at run time in libtorch_cuda) in the
//              stable build, whose own Stream::nativeHandle() needs torch 2.13; no CUDA header
//              and no call into Python;
//   * device:  a device guard makes G's device current while handles are created and used.
//
// Op (tbfast/ops/eig.py defines its schema and fake kernel):
//   tbfast::cusolver_eigvalsh(G, workspace_limit) -> (w, info)   the raw batched solver (CUDA)
// Plain functions (cusolver_runtime.h; module.cpp exposes them as tbfast._C.cusolver_load/_status):
//   cusolver_load(path) -> error ("" on success)                  path "" tries the usual sonames
//   cusolver_status() -> (loaded, path, version, last_error)
// Test-only ops, namespace tbfast_testing (tests/test_cuda.py, scripts/device_check.sh):
//   cusolver_eigvalsh_host(G, workspace_limit) -> (w, info)      CPU tensors, host test double only
//   cusolver_syev_batched_workspace(n, batch, dtype, device) -> (device_bytes, host_bytes)
//   cusolver_syev_batched_plan(n, batch, dtype, device, workspace_limit)
//       -> (matrices per call, device_bytes, host_bytes)
//
// CPU tensors (and device = -1) are accepted only when the loaded library is the host-memory
// test double of tests/test_cuda.py, which lets the chunking and indexing be tested without a GPU.

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cusolver_api.h"
#include "cusolver_runtime.h"
#include "tbfast_torch.h"

#ifdef TBFAST_STABLE_ABI
#include <torch/csrc/stable/accelerator.h>
#else
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#endif

namespace tbfast {
namespace {

using namespace tbfast::cusolver;

constexpr int64_t kDefaultWorkspaceLimit = int64_t(2) << 30;  // 2 GiB

// ---------------------------------------------------------------------------------------------
// The library: loaded once per process, never unloaded (handles live until exit).

struct Library {
  std::mutex mu;
  void* dl = nullptr;
  std::string path;
  std::string last_error;
  int version = -1;  // cusolverGetVersion, e.g. 12000 for cuSOLVER 12.0.0; -1 unknown
  DnCreateFn dn_create = nullptr;
  DnSetStreamFn dn_set_stream = nullptr;
  DnCreateParamsFn dn_create_params = nullptr;
  XsyevBatchedBufferSizeFn syev_batched_buffer_size = nullptr;
  XsyevBatchedFn syev_batched = nullptr;
  // A test double (tests/test_cuda.py) that works on host memory exports this symbol; only
  // then do the ops accept CPU tensors, so the chunking and indexing run without a GPU.
  bool host_memory = false;
};

Library& library() {
  static Library* lib = new Library();  // intentionally leaked: used by handles until exit
  return *lib;
}

template <class Fn>
Fn symbol(void* dl, const char* name) {
  return reinterpret_cast<Fn>(dlsym(dl, name));
}

// Opens one candidate; on success fills `lib` and returns "", else returns why not.
std::string try_open(Library& lib, const std::string& candidate) {
  dlerror();
  void* dl = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!dl) {
    const char* err = dlerror();
    return "dlopen(" + candidate + ") failed: " + (err ? err : "unknown error");
  }
  int version = -1;
  if (auto get_version = symbol<GetVersionFn>(dl, "cusolverGetVersion")) {
    int v = 0;
    if (get_version(&v) == kStatusSuccess) version = v;
  }
  auto create = symbol<DnCreateFn>(dl, "cusolverDnCreate");
  auto set_stream = symbol<DnSetStreamFn>(dl, "cusolverDnSetStream");
  auto create_params = symbol<DnCreateParamsFn>(dl, "cusolverDnCreateParams");
  auto buffer_size = symbol<XsyevBatchedBufferSizeFn>(dl, "cusolverDnXsyevBatched_bufferSize");
  auto syev = symbol<XsyevBatchedFn>(dl, "cusolverDnXsyevBatched");
  if (!create || !set_stream || !create_params) {
    dlclose(dl);
    return candidate + " is not a usable libcusolver (cusolverDnCreate/SetStream/CreateParams missing)";
  }
  if (!buffer_size || !syev) {
    dlclose(dl);
    return candidate + " (cuSOLVER version " + std::to_string(version) +
           ") has no cusolverDnXsyevBatched; it needs cuSOLVER >= 11.7.1 (CUDA 12.6 Update 2 or newer)";
  }
  lib.dl = dl;
  lib.path = candidate;
  lib.version = version;
  lib.dn_create = create;
  lib.dn_set_stream = set_stream;
  lib.dn_create_params = create_params;
  lib.syev_batched_buffer_size = buffer_size;
  lib.syev_batched = syev;
  lib.host_memory = dlsym(dl, "tbfast_fake_cusolver_host_memory") != nullptr;
  lib.last_error.clear();
  return "";
}

// Loads libcusolver from `path`, or, when `path` is empty, by the usual sonames (which finds a
// copy torch already loaded). Returns "" when the library is (already) loaded, else the reason.
std::string load_library(const std::string& path) {
  Library& lib = library();
  std::lock_guard<std::mutex> lock(lib.mu);
  if (lib.dl) return "";
  std::vector<std::string> candidates;
  if (!path.empty()) {
    candidates.push_back(path);
  } else {
    candidates = {"libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"};
  }
  std::string reasons;
  for (const auto& c : candidates) {
    std::string why = try_open(lib, c);
    if (why.empty()) return "";
    if (!reasons.empty()) reasons += "; ";
    reasons += why;
  }
  lib.last_error = reasons;
  return reasons;
}

bool host_memory_library_loaded() {
  Library& lib = library();
  std::lock_guard<std::mutex> lock(lib.mu);
  return lib.dl != nullptr && lib.host_memory;
}

Library& loaded_library() {
  Library& lib = library();
  {
    std::lock_guard<std::mutex> lock(lib.mu);
    if (lib.dl) return lib;
  }
  const std::string why = load_library("");
  TBFAST_CHECK(why.empty(),
              "tbfast: cuSOLVER is not loaded (", why,
              "). Load it first with tbfast.ops.cusolver.cusolver_status(), which searches the nvidia "
              "pip packages and LD_LIBRARY_PATH, or tbfast._C.cusolver_load(path).");
  return lib;
}

// ---------------------------------------------------------------------------------------------
// Per-device handle, parameters and host workspace. A cuSOLVER handle is bound to the device
// that was current when it was created and must not be used concurrently with different
// streams, so every use holds the device's mutex from cusolverDnSetStream to the last enqueue.

struct DeviceState {
  std::mutex mu;
  DnHandle handle = nullptr;
  DnParams params = nullptr;
  std::vector<unsigned char> host_workspace;
};

DeviceState& device_state(int64_t index) {
  static std::mutex map_mu;
  static auto* states = new std::unordered_map<int, std::unique_ptr<DeviceState>>();  // leaked
  std::lock_guard<std::mutex> lock(map_mu);
  auto& slot = (*states)[static_cast<int>(index)];
  if (!slot) slot = std::make_unique<DeviceState>();
  return *slot;
}

void check_status(Status s, const char* what, int64_t n, int64_t batch) {
  TBFAST_CHECK(s == kStatusSuccess, "tbfast: ", what, " failed with ", status_name(s), " (", s,
              ") for n=", n, ", batch=", batch);
}

// Creates the device's handle and params on first use. Caller holds st.mu and a DeviceGuard.
void ensure_handle(Library& lib, DeviceState& st) {
  if (st.handle) return;
  DnHandle h = nullptr;
  check_status(lib.dn_create(&h), "cusolverDnCreate", 0, 0);
  DnParams p = nullptr;
  check_status(lib.dn_create_params(&p), "cusolverDnCreateParams", 0, 0);
  st.handle = h;
  st.params = p;
}

int data_type(ScalarType t) {
  switch (t) {
    case kFloat: return kCudaR32F;
    case kDouble: return kCudaR64F;
    default:
      TBFAST_CHECK(false, "tbfast cuSOLVER eigvalsh: expected float32 or float64 matrices, got ", dtype_name(t));
  }
}

// Row-major (torch) lower triangle == column-major (cuSOLVER) upper triangle.
constexpr int kUploTorchLower = kFillModeUpper;

struct Sizes {
  size_t device = 0;
  size_t host = 0;
};

Sizes query(Library& lib, DeviceState& st, int dt, int64_t n, int64_t batch, const void* A,
            const void* W) {
  Sizes s;
  check_status(lib.syev_batched_buffer_size(st.handle, st.params, kEigModeNoVector, kUploTorchLower,
                                            n, dt, A, n, dt, W, dt, &s.device, &s.host, batch),
               "cusolverDnXsyevBatched_bufferSize", n, batch);
  return s;
}

struct Plan {
  int64_t chunk = 0;  // matrices per cuSOLVER call
  Sizes sizes;        // workspace for one call of `chunk` matrices
};

// Largest number of matrices per call whose solver workspace plus the copy of their input
// (cuSOLVER overwrites it) stays within `limit` bytes; at least one matrix per call.
Plan plan_chunks(Library& lib, DeviceState& st, int dt, int64_t n, int64_t batch, int64_t limit,
                 size_t elem_size, const void* A, const void* W) {
  const uint64_t matrix_bytes = uint64_t(n) * uint64_t(n) * elem_size;
  const uint64_t cap = static_cast<uint64_t>(limit);
  auto cost = [&](int64_t b, const Sizes& s) { return uint64_t(s.device) + uint64_t(b) * matrix_bytes; };
  Plan plan;
  plan.chunk = batch;
  plan.sizes = query(lib, st, dt, n, batch, A, W);
  if (cost(batch, plan.sizes) <= cap || batch == 1) return plan;
  // Model the cost as fixed + marginal * b from the queries at b = 1 and b = batch, take the
  // largest chunk the model allows, then query and shrink until the real cost fits.
  const Sizes one = query(lib, st, dt, n, 1, A, W);
  const double cost_one = double(cost(1, one));
  const double marginal = std::max((double(cost(batch, plan.sizes)) - cost_one) / double(batch - 1), 1.0);
  const double fixed = std::max(cost_one - marginal, 0.0);
  const double fit = double(cap) > fixed ? (double(cap) - fixed) / marginal : 1.0;
  int64_t chunk = fit >= double(batch - 1) ? batch - 1 : std::max<int64_t>(1, static_cast<int64_t>(fit));
  Sizes s = query(lib, st, dt, n, chunk, A, W);
  while (chunk > 1 && cost(chunk, s) > cap) {
    // workspace need not grow linearly with the batch: shrink proportionally, by >= 1 matrix
    const int64_t scaled = static_cast<int64_t>(double(chunk) * double(cap) / double(cost(chunk, s)));
    chunk = std::max<int64_t>(1, std::min<int64_t>(chunk - 1, scaled));
    s = query(lib, st, dt, n, chunk, A, W);
  }
  plan.chunk = chunk;
  plan.sizes = s;
  return plan;
}

// The C shim's aoti_torch_get_current_cuda_stream, a stable C function exported by libtorch_cuda,
// looked up at run time so that no CUDA header is needed: torch's current cudaStream_t on `device`.
void* shim_current_stream(int64_t device) {
  using GetStreamFn = int32_t (*)(int32_t device_index, void** ret_stream);
  auto fn = reinterpret_cast<GetStreamFn>(dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream"));
  if (fn == nullptr) {
    if (void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD)) {
      fn = reinterpret_cast<GetStreamFn>(dlsym(lib, "aoti_torch_get_current_cuda_stream"));
    }
  }
  TBFAST_CHECK(fn != nullptr, "tbfast cuSOLVER eigvalsh: this torch has neither c10::Stream::native_handle "
               "nor aoti_torch_get_current_cuda_stream; cannot find the current CUDA stream");
  void* stream = nullptr;
  TBFAST_CHECK(fn(static_cast<int32_t>(device), &stream) == 0,
               "tbfast cuSOLVER eigvalsh: aoti_torch_get_current_cuda_stream failed");
  return stream;
}

#ifndef TBFAST_STABLE_ABI
// stream_pointer: the native handle (cudaStream_t) of a c10::Stream, by the first of these that
// the torch headers offer (chosen at compile time, so one source builds against any torch 2.x):
//   2. c10::Stream::native_handle()   (torch 2.13 declares it);
//   1. c10::Stream::stream_handle()   (the same accessor under an earlier name);
//   0. the C shim's aoti_torch_get_current_cuda_stream (shim_current_stream).
template <int N>
struct Rank : Rank<N - 1> {};
template <>
struct Rank<0> {};

template <class S>
auto stream_pointer(const S& s, Rank<2>) -> decltype(s.native_handle()) {
  return s.native_handle();
}

template <class S>
auto stream_pointer(const S& s, Rank<1>) -> decltype(s.stream_handle()) {
  return s.stream_handle();
}

template <class S>
void* stream_pointer(const S& s, Rank<0>) {
  return shim_current_stream(s.device_index());
}
#endif

// torch's current cudaStream_t on CUDA device `device` (the stream torch enqueues G's producers on).
void* current_stream(int64_t device) {
#ifdef TBFAST_STABLE_ABI
  return shim_current_stream(device);
#else
  const c10::Device dev(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(dev);
  return stream_pointer(stream, Rank<2>{});
#endif
}

// Makes CUDA device `device` current for its lifetime (nothing for device < 0: host memory).
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int64_t device) {
    if (device < 0) return;
#ifdef TBFAST_STABLE_ABI
    guard_ = std::make_unique<torch::stable::accelerator::DeviceGuard>(
        static_cast<torch::stable::accelerator::DeviceIndex>(device));
#else
    guard_.reset_device(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
#endif
  }

 private:
#ifdef TBFAST_STABLE_ABI
  std::unique_ptr<torch::stable::accelerator::DeviceGuard> guard_;
#else
  c10::OptionalDeviceGuard guard_;
#endif
};

// A slice [start, start + length) of the first dimension.
Tensor narrow0(const Tensor& t, int64_t start, int64_t length) {
#ifdef TBFAST_STABLE_ABI
  return torch::stable::narrow(const_cast<Tensor&>(t), 0, start, length);
#else
  return t.narrow(0, start, length);
#endif
}

void copy_into(Tensor& dst, const Tensor& src) {
#ifdef TBFAST_STABLE_ABI
  torch::stable::copy_(dst, src);
#else
  dst.copy_(src);
#endif
}

std::tuple<Tensor, Tensor> syev_batched(const Tensor& G, int64_t workspace_limit) {
  const bool on_host = G.is_cpu() && host_memory_library_loaded();  // test double only
  TBFAST_CHECK(G.is_cuda() || on_host, "tbfast cuSOLVER eigvalsh: G must be a CUDA tensor, got device ",
               device_name(G));
  TBFAST_CHECK(G.dim() == 3 && G.size(1) == G.size(2),
               "tbfast cuSOLVER eigvalsh: expected a (B, n, n) batch of square matrices, got shape ",
               shape_of(G));
  TBFAST_CHECK(workspace_limit >= 0, "tbfast cuSOLVER eigvalsh: workspace_limit must be >= 0, got ",
               workspace_limit);
  const int dt = data_type(G.scalar_type());
  const int64_t batch = G.size(0);
  const int64_t n = G.size(1);
  Tensor W = new_empty(G, {batch, n}, G.scalar_type());
  Tensor info = new_zeros(G, {batch}, kInt);
  if (batch == 0 || n == 0) return {W, info};
  TBFAST_CHECK(n <= INT32_MAX, "tbfast cuSOLVER eigvalsh: n=", n, " is too large");

  Library& lib = loaded_library();
  const int64_t device = on_host ? -1 : static_cast<int64_t>(G.get_device());
  CudaDeviceGuard guard(device);
  Stream stream = on_host ? nullptr : current_stream(device);
  const int64_t limit = workspace_limit > 0 ? workspace_limit : kDefaultWorkspaceLimit;
  const size_t elem = G.element_size();

  DeviceState& st = device_state(device);
  std::lock_guard<std::mutex> lock(st.mu);
  ensure_handle(lib, st);
  check_status(lib.dn_set_stream(st.handle, stream), "cusolverDnSetStream", n, batch);

  const Plan plan = plan_chunks(lib, st, dt, n, batch, limit, elem, G.data_ptr(), W.data_ptr());
  // Scratch copy of one chunk (cuSOLVER overwrites its input) and the device workspace, both
  // from torch's caching allocator on the current stream, freed (stream-ordered) on return.
  Tensor A = new_empty(G, {plan.chunk, n, n}, G.scalar_type());
  Tensor device_ws = new_empty(G, {static_cast<int64_t>(std::max<size_t>(plan.sizes.device, 1))}, kByte);
  for (int64_t start = 0; start < batch; start += plan.chunk) {
    const int64_t b = std::min(plan.chunk, batch - start);
    Tensor a = narrow0(A, 0, b);
    copy_into(a, narrow0(G, start, b));
    Sizes sizes = plan.sizes;
    if (b != plan.chunk) {
      sizes = query(lib, st, dt, n, b, a.data_ptr(), W.data_ptr());
      if (sizes.device > static_cast<size_t>(device_ws.numel())) {
        device_ws = new_empty(G, {static_cast<int64_t>(sizes.device)}, kByte);
      }
    }
    if (st.host_workspace.size() < std::max<size_t>(sizes.host, 1)) {
      st.host_workspace.resize(std::max<size_t>(sizes.host, 1));
    }
    void* w_ptr = static_cast<char*>(W.data_ptr()) + static_cast<size_t>(start * n) * elem;
    int* info_ptr = info.mutable_data_ptr<int>() + start;
    check_status(lib.syev_batched(st.handle, st.params, kEigModeNoVector, kUploTorchLower, n, dt,
                                  a.data_ptr(), n, dt, w_ptr, dt, device_ws.data_ptr(), sizes.device,
                                  st.host_workspace.data(), sizes.host, info_ptr, b),
                 "cusolverDnXsyevBatched", n, b);
  }
  return {W, info};
}

// Workspace planning for (n, batch) matrices of `dtype` on CUDA device `device`, using tiny
// placeholder buffers (the size queries do not read the matrices).
std::tuple<int64_t, int64_t, int64_t> plan_op(int64_t n, int64_t batch, ScalarType dtype, int64_t device,
                                              int64_t workspace_limit) {
  TBFAST_CHECK(n >= 1 && batch >= 1, "tbfast cusolver plan: need n >= 1 and batch >= 1, got n=", n,
               ", batch=", batch);
  const int dt = data_type(dtype);
  Library& lib = loaded_library();
  // device < 0: host memory, accepted only by the test double
  TBFAST_CHECK(device >= 0 || lib.host_memory, "tbfast cusolver plan: device must be a CUDA device index, got ",
               device);
  CudaDeviceGuard guard(device);
#ifdef TBFAST_STABLE_ABI
  const torch::stable::Device dev = device >= 0
      ? torch::stable::Device(torch::headeronly::DeviceType::CUDA, static_cast<torch::stable::DeviceIndex>(device))
      : torch::stable::Device(torch::headeronly::DeviceType::CPU);
  Tensor placeholder_a = torch::stable::empty({1}, dtype, std::nullopt, dev);
  Tensor placeholder_w = torch::stable::empty({1}, dtype, std::nullopt, dev);
#else
  const c10::Device dev = device >= 0 ? c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device))
                                      : c10::Device(c10::DeviceType::CPU);
  const auto opts = at::TensorOptions().device(dev).dtype(dtype);
  at::Tensor placeholder_a = at::empty({1}, opts);
  at::Tensor placeholder_w = at::empty({1}, opts);
#endif
  DeviceState& st = device_state(device);
  std::lock_guard<std::mutex> lock(st.mu);
  ensure_handle(lib, st);
  const int64_t limit = workspace_limit > 0 ? workspace_limit : kDefaultWorkspaceLimit;
  const Plan plan = plan_chunks(lib, st, dt, n, batch, limit, dtype_size(dtype),
                                placeholder_a.data_ptr(), placeholder_w.data_ptr());
  return {plan.chunk, static_cast<int64_t>(plan.sizes.device), static_cast<int64_t>(plan.sizes.host)};
}

std::tuple<int64_t, int64_t> workspace_op(int64_t n, int64_t batch, ScalarType dtype, int64_t device) {
  // An unlimited budget plans the whole batch in one call.
  const auto plan = plan_op(n, batch, dtype, device, INT64_MAX);
  return {std::get<1>(plan), std::get<2>(plan)};
}

}  // namespace

std::string cusolver_load(const std::string& path) { return load_library(path); }

CusolverStatus cusolver_status() {
  Library& lib = library();
  std::lock_guard<std::mutex> lock(lib.mu);
  return {lib.dl != nullptr, lib.path, static_cast<int64_t>(lib.version), lib.last_error};
}

}  // namespace tbfast

// The schema of tbfast::cusolver_eigvalsh (and its fake kernel) is defined in tbfast/ops/eig.py.
TBFAST_LIBRARY_IMPL(tbfast, CUDA, m) {
  m.impl("cusolver_eigvalsh", TBFAST_KERNEL(tbfast::syev_batched));
}

TBFAST_LIBRARY_FRAGMENT(tbfast_testing, m) {
  m.def("cusolver_eigvalsh_host(Tensor G, int workspace_limit) -> (Tensor, Tensor)");
  m.def("cusolver_syev_batched_workspace(int n, int batch, ScalarType dtype, int device) -> (int, int)");
  m.def("cusolver_syev_batched_plan(int n, int batch, ScalarType dtype, int device, int workspace_limit)"
        " -> (int, int, int)");
}

TBFAST_LIBRARY_IMPL(tbfast_testing, CPU, m) {
  // Only for the host-memory test double; any other CPU call gets "must be a CUDA tensor".
  m.impl("cusolver_eigvalsh_host", TBFAST_KERNEL(tbfast::syev_batched));
}

// The planning probes take no tensor: registered for CompositeExplicitAutograd, the kernel the
// dispatcher runs for an op without tensor arguments.
TBFAST_LIBRARY_IMPL(tbfast_testing, CompositeExplicitAutograd, m) {
  m.impl("cusolver_syev_batched_workspace", TBFAST_KERNEL(tbfast::workspace_op));
  m.impl("cusolver_syev_batched_plan", TBFAST_KERNEL(tbfast::plan_op));
}
