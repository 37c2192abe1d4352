// Loading libcusolver at run time (csrc/cusolver_runtime.cpp): two plain functions that
// csrc/module.cpp exposes as tbfast._C.cusolver_load / tbfast._C.cusolver_status (no tensors,
// so they are CPython functions rather than torch ops).
#pragma once

#include <cstdint>
#include <string>

namespace tbfast {

// What libcusolver this process holds: whether one is loaded, its path, its version
// (cusolverGetVersion, -1 unknown) and the last load error ("" if none).
struct CusolverStatus {
  bool loaded;
  std::string path;
  int64_t version;
  std::string last_error;
};

// dlopens libcusolver from `path` ("" tries libcusolver.so.12, .so.11, .so); returns "" on
// success or when one is already loaded, else why not. Never throws.
std::string cusolver_load(const std::string& path);

CusolverStatus cusolver_status();

}  // namespace tbfast
