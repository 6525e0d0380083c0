// The pack/unpack kernel and its descriptor table, free of ATen so that a host-only
// emulation (tests/test_kernels_emulated.py) can compile and check the exact index
// arithmetic on machines without a GPU. pack_cuda.cu launches it.
//
// Each thread block belongs to one tensor (a range of blocks per descriptor, found by
// binary search); each thread moves one 16-byte vector of the packed side: the
// contiguous flat buffer is read or written with one vector access when aligned, the
// gathered side element by element (dense tensors are vectorised on both sides).
// Positions are split into (row, column, inner) with multiply-shift division, since a
// 64-bit division per element would cost more than the memory traffic.
#pragma once

#include <cstdint>
#include <vector>

namespace approxdist {
namespace cuda_kernel {

constexpr int kThreads = 256;
constexpr int kVecBytes = 16;

// Unsigned division by a runtime constant d (1 <= d < 2^31) for n < 2^31: q = (hi(n*m) + n) >> s.
struct FastDiv {
  uint32_t mul = 1;
  uint32_t shift = 0;
  uint32_t d = 1;

  static FastDiv make(uint32_t divisor) {
    FastDiv f;
    f.d = divisor;
    uint32_t s = 0;
    while (s < 32 && (uint64_t(1) << s) < divisor) ++s;
    const uint64_t one = 1;
    const uint64_t magic = ((one << 32) * ((one << s) - divisor)) / divisor + 1;
    f.mul = static_cast<uint32_t>(magic);
    f.shift = s;
    return f;
  }

  __device__ __forceinline__ void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    const uint32_t t = __umulhi(n, mul);
    q = (t + n) >> shift;
    r = n - q * d;
  }
};

enum : int32_t {
  kDense = 1,      // straight copy of numel elements
  kWide = 2,       // some extent >= 2^31: plain 64-bit arithmetic
  kFlatVec = 4,    // this tensor's packed slice starts 16-byte aligned
  kTensorVec = 8,  // the tensor's data starts 16-byte aligned
};

struct Desc {
  int64_t data;         // address of the tensor's data
  int64_t idx;          // address of the indices (0 when dense)
  int64_t offset;       // element offset of the packed slice
  int64_t numel;        // elements of the packed slice
  int64_t block_begin;  // first block of this tensor
  int64_t cols;
  int64_t inner;
  int64_t k;
  FastDiv div_inner;
  FastDiv div_k;
  int32_t flags;
  int32_t pad;
};

template <int SIZE>
struct Elem;
template <>
struct Elem<1> { using T = uint8_t; };
template <>
struct Elem<2> { using T = uint16_t; };
template <>
struct Elem<4> { using T = uint32_t; };
template <>
struct Elem<8> { using T = uint64_t; };

template <int SIZE, bool PACK>
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const Desc* __restrict__ descs, int n_desc, char* __restrict__ flat_base) {
  using T = typename Elem<SIZE>::T;
  constexpr int V = kVecBytes / SIZE;
  union Vec {
    uint4 v;
    T e[V];
  };

  __shared__ int s_desc;
  const int64_t block = blockIdx.x;
  if (threadIdx.x == 0) {
    int lo = 0, hi = n_desc - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (descs[mid].block_begin <= block) lo = mid; else hi = mid - 1;
    }
    s_desc = lo;
  }
  __syncthreads();
  const Desc& d = descs[s_desc];
  const int64_t e0 = ((block - d.block_begin) * kThreads + threadIdx.x) * V;
  if (e0 >= d.numel) return;
  const int nv = d.numel - e0 < V ? static_cast<int>(d.numel - e0) : V;
  T* flat = reinterpret_cast<T*>(flat_base) + d.offset + e0;
  const bool flat_vec = (d.flags & kFlatVec) && nv == V;

  if (d.flags & kDense) {
    T* ten = reinterpret_cast<T*>(d.data) + e0;
    if (flat_vec && (d.flags & kTensorVec)) {
      if (PACK) {
        *reinterpret_cast<uint4*>(flat) = *reinterpret_cast<const uint4*>(ten);
      } else {
        *reinterpret_cast<uint4*>(ten) = *reinterpret_cast<const uint4*>(flat);
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (v < nv) {
          if (PACK) flat[v] = ten[v]; else ten[v] = flat[v];
        }
      }
    }
    return;
  }

  // Position of e0 in (row, column j of the selection, inner c), then stepped forward.
  int64_t row, j, c;
  if (d.flags & kWide) {
    const int64_t q = e0 / d.inner;
    c = e0 - q * d.inner;
    row = q / d.k;
    j = q - row * d.k;
  } else {
    uint32_t q, r, rr, jj;
    d.div_inner.divmod(static_cast<uint32_t>(e0), q, r);
    d.div_k.divmod(q, rr, jj);
    c = r;
    row = rr;
    j = jj;
  }
  T* ten = reinterpret_cast<T*>(d.data);
  const int64_t* idx = reinterpret_cast<const int64_t*>(d.idx);
  int64_t base = (row * d.cols + idx[j]) * d.inner;

  Vec buf;
  if (!PACK) {
    if (flat_vec) {
      buf.v = *reinterpret_cast<const uint4*>(flat);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (v < nv) buf.e[v] = flat[v];
      }
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if (v < nv) {
      if (PACK) buf.e[v] = ten[base + c]; else ten[base + c] = buf.e[v];
      if (++c == d.inner) {
        c = 0;
        if (++j == d.k) {
          j = 0;
          ++row;
        }
        if (v + 1 < nv) base = (row * d.cols + idx[j]) * d.inner;
      }
    }
  }
  if (PACK) {
    if (flat_vec) {
      *reinterpret_cast<uint4*>(flat) = buf.v;
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (v < nv) flat[v] = buf.e[v];
      }
    }
  }
}


// One tensor's part in a call, in plain numbers (addresses as integers).
struct TensorSpec {
  uint64_t data;
  uint64_t idx;  // 0 when dense
  int64_t offset;
  int64_t numel;
  int64_t cols;
  int64_t inner;
  int64_t k;
  bool dense;
};

// force_wide exercises the 64-bit path on small tensors (emulation tests only).
inline std::vector<Desc> make_descs(const std::vector<TensorSpec>& specs, uint64_t flat_addr,
                                    int64_t es, int64_t* total_blocks, bool force_wide = false) {
  const int64_t per_block = kThreads * (kVecBytes / es);
  const int64_t i32 = INT32_MAX;
  std::vector<Desc> descs;
  descs.reserve(specs.size());
  int64_t blocks = 0;
  for (const TensorSpec& s : specs) {
    if (s.numel == 0) continue;
    Desc d{};
    d.data = static_cast<int64_t>(s.data);
    d.offset = s.offset;
    d.numel = s.numel;
    d.block_begin = blocks;
    d.cols = s.cols;
    d.inner = s.inner;
    d.k = s.k;
    if (s.dense) {
      d.flags |= kDense;
    } else {
      d.idx = static_cast<int64_t>(s.idx);
      if (force_wide || s.numel >= i32 || s.inner >= i32 || s.k >= i32) {
        d.flags |= kWide;
      } else {
        d.div_inner = FastDiv::make(static_cast<uint32_t>(s.inner));
        d.div_k = FastDiv::make(static_cast<uint32_t>(s.k));
      }
    }
    if ((flat_addr + s.offset * es) % kVecBytes == 0) d.flags |= kFlatVec;
    if (s.data % kVecBytes == 0) d.flags |= kTensorVec;
    descs.push_back(d);
    blocks += (s.numel + per_block - 1) / per_block;
  }
  *total_blocks = blocks;
  return descs;
}

}  // namespace cuda_kernel
}  // namespace approxdist
