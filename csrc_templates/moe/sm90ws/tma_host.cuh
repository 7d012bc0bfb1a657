// Host helpers of the sm90ws kernel: 2-D TMA descriptors.
//
// The descriptors are encoded with the driver's cuTensorMapEncodeTiled, fetched once through the runtime's
// cudaGetDriverEntryPoint so the extension links only cudart (no -lcuda). Each map views a row-major [rows, cols]
// matrix of 16-bit or 8-bit elements (cols contiguous) and loads boxes of [box_rows, 128 bytes] into shared memory
// with the 128-byte swizzle that CuTe's K-major SW128 GMMA layout expects (int8 weights: [box_rows, 64 bytes],
// unswizzled); out-of-range rows and columns of a box are zero-filled by the hardware. Errors surface as C++
// exceptions, which pybind11 turns into Python exceptions.
#pragma once
#include <cuda.h>  // CUtensorMap and its enums only (header types; nothing here links libcuda)
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>
#include <stdexcept>
#include <string>

namespace jitmoe::moe::sm90ws {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050  // the unversioned query is deprecated from 12.5 on
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                             cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || ptr == nullptr) {
      throw std::runtime_error(std::string("moe_gemm sm90ws: cuTensorMapEncodeTiled is not available from the "
                                           "driver (") + cudaGetErrorString(err) + ")");
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// The TMA element type of a kernel element type.
template <typename E>
constexpr CUtensorMapDataType tma_dtype() {
  if constexpr (sizeof(E) == 1) return CU_TENSOR_MAP_DATA_TYPE_UINT8;  // FP8: TMA only moves the bytes
  else if constexpr (std::is_same_v<E, __half>) return CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  else return CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}

// A [rows, cols] row-major matrix of elem_bytes-byte elements at `base`, loaded in boxes of [box_rows, box_bytes]
// (by default one 128-byte swizzle row per box row; int8 weights take unswizzled 64-byte rows).
inline CUtensorMap make_tma_map_2d(const void* base, CUtensorMapDataType dtype, int elem_bytes, int64_t rows,
                                   int64_t cols, int box_rows, int box_bytes = 128,
                                   CUtensorMapSwizzle swizzle = CU_TENSOR_MAP_SWIZZLE_128B) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t row_stride_bytes[1] = {static_cast<cuuint64_t>(cols) * elem_bytes};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_bytes / elem_bytes), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult res = encode_tiled_fn()(&map, dtype, 2, const_cast<void*>(base), dims, row_stride_bytes, box,
                                         elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                         CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) {
    throw std::runtime_error("moe_gemm sm90ws: cuTensorMapEncodeTiled failed (CUresult " + std::to_string(res) +
                             ") for a [" + std::to_string(rows) + ", " + std::to_string(cols) + "] matrix, box [" +
                             std::to_string(box_rows) + ", " + std::to_string(box_bytes / elem_bytes) + "]");
  }
  return map;
}

}  // namespace jitmoe::moe::sm90ws
