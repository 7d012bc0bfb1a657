"""DRAM read rate of a 402 MB [rows, row_bytes] uint8 matrix (row_bytes 2048, 768, 1024) read the way a GEMM's
k-loop reads its weight tile: every CTA takes 256 rows and walks K in steps of W bytes per row (W = 64: int8 at
BK 64; 128: bf16 at BK 64), 16 loads of 16 B in flight per thread; 'linear' reads the same bytes front to back.
Plain loads (__ldcs), not TMA: the sm90ws kernel's TMA boxes ask L2 for 256-byte promotion besides."""
import torch
from torch.utils.cpp_extension import load_inline
src = r"""
#include <torch/extension.h>
#include <cuda_runtime.h>
template <int W>
__global__ void __launch_bounds__(256) strips(const uint4* __restrict__ m, int row_bytes, unsigned* out) {
  constexpr int kPer = W / 16;            // chunks per thread per step (256 rows x W/16 chunks / 256 threads)
  constexpr int kU = 16 / kPer;           // steps in flight
  const char* slab = reinterpret_cast<const char*>(m) + (size_t)blockIdx.x * 256 * row_bytes;
  unsigned accv = 0;
  const int steps = row_bytes / W;
  for (int s0 = 0; s0 < steps; s0 += kU) {
    uint4 v[kU][kPer];
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int c = threadIdx.x + 256 * i;
        const int row = c / kPer, col = c % kPer;
        v[u][i] = __ldcs(reinterpret_cast<const uint4*>(slab + (size_t)row * row_bytes + (s0 + u) * W) + col);
      }
#pragma unroll
    for (int u = 0; u < kU; ++u)
#pragma unroll
      for (int i = 0; i < kPer; ++i) accv ^= v[u][i].x ^ v[u][i].y ^ v[u][i].z ^ v[u][i].w;
  }
  if (accv == 0x12345678u) out[0] = accv;
}
__global__ void __launch_bounds__(256) linear(const uint4* __restrict__ m, size_t chunks, unsigned* out) {
  unsigned accv = 0;
  const size_t stride = (size_t)gridDim.x * 256 * 16;
  for (size_t b = (size_t)blockIdx.x * 256 * 16 + threadIdx.x; b < chunks; b += stride) {
    uint4 v[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = b + 256 * i < chunks ? __ldcs(m + b + 256 * i) : make_uint4(0,0,0,0);
#pragma unroll
    for (int i = 0; i < 16; ++i) accv ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
  }
  if (accv == 0x12345678u) out[0] = accv;
}
void run(torch::Tensor m, int64_t row_bytes, int64_t w, torch::Tensor out) {
  const int slabs = m.numel() / (256 * row_bytes);
  auto p = reinterpret_cast<const uint4*>(m.data_ptr());
  auto o = reinterpret_cast<unsigned*>(out.data_ptr());
  if (w == 64) strips<64><<<slabs, 256>>>(p, row_bytes, o);
  else if (w == 128) strips<128><<<slabs, 256>>>(p, row_bytes, o);
  else if (w == 256) strips<256><<<slabs, 256>>>(p, row_bytes, o);
  else linear<<<132 * 8, 256>>>(p, m.numel() / 16, o);
}
"""
mod = load_inline("stream_probe",
                  cpp_sources="void run(torch::Tensor m, int64_t row_bytes, int64_t w, torch::Tensor out);",
                  cuda_sources=src, functions=["run"],
                  extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"])
for row_bytes in (2048, 768 * 2 // 2, 1024):
    rows = (402 << 20) // row_bytes // 256 * 256
    m = torch.randint(0, 255, (rows * row_bytes,), dtype=torch.uint8, device="cuda")
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    for w in (64, 128, 256, 0):
        if w and row_bytes % (w * (16 // (w // 16))) != 0:
            continue
        ts = []
        for it in range(15):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); mod.run(m, row_bytes, w, out); b.record(); torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        t = sorted(ts[3:])[len(ts[3:]) // 2]
        print(f"row_bytes {row_bytes:5d} W {w if w else 'linear':>6}: {t*1e3:8.1f} us  "
              f"{m.numel() / t / 1e9:6.2f} TB/s", flush=True)
    del m
