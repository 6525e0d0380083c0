// Multi-tensor pack/unpack of sampled gradient slices on CUDA: one launch per call.
//
// Why one launch: a DDP bucket holds up to a few hundred parameters, and a gather +
// copy per parameter costs two launches each, which dominates for the small ones. Here
// a table of per-tensor descriptors (uploaded with a non-blocking copy from pinned
// memory, ordered on the current stream, so the host never waits) gives every tensor a
// range of thread blocks; a block finds its tensor by binary search over the table.
//
// Each thread moves one 16-byte vector of the packed side: the contiguous flat buffer
// is read or written with one vector access when aligned, the gathered side element by
// element (dense tensors are vectorised on both sides). Positions are split into (row,
// column, inner) with multiply-shift division, since 64-bit division per element would
// cost more than the memory traffic.
// Light headers on purpose: ATen/cuda/CUDAContext.h drags in cuBLAS/cuSPARSE headers,
// which some toolkits lack, and doubles the compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "pack_plan.h"

namespace approxdist {
namespace {

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

template <bool PACK>
void launch(const std::vector<at::Tensor>& grads,
            const std::vector<std::optional<at::Tensor>>& indices, const std::vector<Geom>& plan,
            const at::Tensor& flat) {
  const int64_t es = flat.element_size();
  TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8,
              "approxdist CUDA kernels support element sizes 1, 2, 4 and 8, got ", es);
  const int64_t per_block = kThreads * (kVecBytes / es);
  const uintptr_t flat_addr = reinterpret_cast<uintptr_t>(flat.data_ptr());
  const int64_t i32 = std::numeric_limits<int32_t>::max();

  std::vector<Desc> descs;
  descs.reserve(plan.size());
  int64_t blocks = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    const Geom& g = plan[i];
    if (g.numel == 0) continue;
    Desc d;
    std::memset(&d, 0, sizeof(d));
    d.data = static_cast<int64_t>(reinterpret_cast<uintptr_t>(grads[i].data_ptr()));
    d.offset = g.offset;
    d.numel = g.numel;
    d.block_begin = blocks;
    d.cols = g.cols;
    d.inner = g.inner;
    d.k = g.k;
    d.flags = 0;
    if (g.dense) {
      d.flags |= kDense;
    } else {
      d.idx = static_cast<int64_t>(reinterpret_cast<uintptr_t>(indices[i]->data_ptr()));
      if (g.numel >= i32 || g.inner >= i32 || g.k >= i32) {
        d.flags |= kWide;
      } else {
        d.div_inner = FastDiv::make(static_cast<uint32_t>(g.inner));
        d.div_k = FastDiv::make(static_cast<uint32_t>(g.k));
      }
    }
    if ((flat_addr + g.offset * es) % kVecBytes == 0) d.flags |= kFlatVec;
    if (static_cast<uint64_t>(d.data) % kVecBytes == 0) d.flags |= kTensorVec;
    descs.push_back(d);
    blocks += (g.numel + per_block - 1) / per_block;
  }
  if (descs.empty()) return;
  TORCH_CHECK(blocks <= i32, "approxdist pack: buffer too large for one launch");

  const c10::cuda::CUDAGuard guard(flat.device());
  const int64_t nbytes = static_cast<int64_t>(descs.size() * sizeof(Desc));
  at::Tensor host = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), descs.data(), nbytes);
  // copy_ from pinned memory records an event with the host allocator, so the pinned
  // block is not reused before the upload has run; no synchronisation is needed.
  at::Tensor dev = at::empty({nbytes}, flat.options().dtype(at::kByte));
  dev.copy_(host, /*non_blocking=*/true);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(flat.device().index());
  const Desc* table = reinterpret_cast<const Desc*>(dev.data_ptr());
  char* base = static_cast<char*>(flat.data_ptr());
  const int n = static_cast<int>(descs.size());
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (es) {
    case 1: pack_kernel<1, PACK><<<grid, kThreads, 0, stream>>>(table, n, base); break;
    case 2: pack_kernel<2, PACK><<<grid, kThreads, 0, stream>>>(table, n, base); break;
    case 4: pack_kernel<4, PACK><<<grid, kThreads, 0, stream>>>(table, n, base); break;
    default: pack_kernel<8, PACK><<<grid, kThreads, 0, stream>>>(table, n, base); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void pack_cuda(const std::vector<at::Tensor>& grads,
               const std::vector<std::optional<at::Tensor>>& indices,
               const std::vector<Geom>& plan, at::Tensor& out) {
  launch<true>(grads, indices, plan, out);
}

void unpack_cuda(const at::Tensor& flat, const std::vector<at::Tensor>& grads,
                 const std::vector<std::optional<at::Tensor>>& indices,
                 const std::vector<Geom>& plan) {
  launch<false>(grads, indices, plan, flat);
}

}  // namespace approxdist
