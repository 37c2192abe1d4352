// The small part of the cuSOLVER / CUDA runtime ABI that tbfast uses, declared by hand.
//
// tbfast._C is built without the CUDA toolkit, so nothing here includes a CUDA header: handles
// and streams are opaque pointers and the C enums are passed as int (C enums are int-sized on
// every platform cuSOLVER supports). The values are the documented ones from library_types.h,
// cublas_api.h and cusolver_common.h:
//   cudaDataType:        CUDA_R_32F = 0, CUDA_R_64F = 1
//   cusolverEigMode_t:   CUSOLVER_EIG_MODE_NOVECTOR = 0, CUSOLVER_EIG_MODE_VECTOR = 1
//   cublasFillMode_t:    CUBLAS_FILL_MODE_LOWER = 0, CUBLAS_FILL_MODE_UPPER = 1
//   libraryPropertyType: MAJOR_VERSION = 0, MINOR_VERSION = 1, PATCH_LEVEL = 2
//   cusolverStatus_t:    CUSOLVER_STATUS_SUCCESS = 0 (others named in cusolver_status_name)
// The function pointer types below mirror the signatures of the 64-bit cuSOLVER API
// (cusolverDnXsyevBatched appeared in cuSOLVER 11.7.1, CUDA 12.6 Update 2).
#pragma once

#include <cstddef>
#include <cstdint>

namespace tbfast {
namespace cusolver {

using Status = int;          // cusolverStatus_t
using DnHandle = void*;      // cusolverDnHandle_t
using DnParams = void*;      // cusolverDnParams_t
using Stream = void*;        // cudaStream_t

constexpr Status kStatusSuccess = 0;
constexpr int kCudaR32F = 0;
constexpr int kCudaR64F = 1;
constexpr int kEigModeNoVector = 0;
constexpr int kFillModeLower = 0;
constexpr int kFillModeUpper = 1;
constexpr int kMajorVersion = 0;
constexpr int kMinorVersion = 1;
constexpr int kPatchLevel = 2;

using GetVersionFn = Status (*)(int* version);
using GetPropertyFn = Status (*)(int type, int* value);
using DnCreateFn = Status (*)(DnHandle* handle);
using DnSetStreamFn = Status (*)(DnHandle handle, Stream stream);
using DnCreateParamsFn = Status (*)(DnParams* params);

// cusolverDnXsyevBatched_bufferSize(handle, params, jobz, uplo, n, dataTypeA, A, lda,
//                                   dataTypeW, W, computeType, &deviceBytes, &hostBytes, batchSize)
using XsyevBatchedBufferSizeFn = Status (*)(DnHandle handle, DnParams params, int jobz, int uplo,
                                            int64_t n, int data_type_a, const void* A, int64_t lda,
                                            int data_type_w, const void* W, int compute_type,
                                            size_t* device_bytes, size_t* host_bytes,
                                            int64_t batch_size);

// cusolverDnXsyevBatched(handle, params, jobz, uplo, n, dataTypeA, A, lda, dataTypeW, W,
//                        computeType, bufferOnDevice, deviceBytes, bufferOnHost, hostBytes,
//                        info (device, one int per matrix), batchSize)
using XsyevBatchedFn = Status (*)(DnHandle handle, DnParams params, int jobz, int uplo, int64_t n,
                                  int data_type_a, void* A, int64_t lda, int data_type_w, void* W,
                                  int compute_type, void* device_buffer, size_t device_bytes,
                                  void* host_buffer, size_t host_bytes, int* info,
                                  int64_t batch_size);

// Human-readable name of a cusolverStatus_t value.
inline const char* status_name(Status s) {
  switch (s) {
    case 0: return "CUSOLVER_STATUS_SUCCESS";
    case 1: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case 2: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case 3: return "CUSOLVER_STATUS_INVALID_VALUE";
    case 4: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case 5: return "CUSOLVER_STATUS_MAPPING_ERROR";
    case 6: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case 7: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case 8: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case 9: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    case 10: return "CUSOLVER_STATUS_ZERO_PIVOT";
    case 11: return "CUSOLVER_STATUS_INVALID_LICENSE";
    case 31: return "CUSOLVER_STATUS_INVALID_WORKSPACE";
    default: return "CUSOLVER_STATUS_(unknown)";
  }
}

}  // namespace cusolver
}  // namespace tbfast
