// Multi-tensor pack/unpack of sampled gradient slices on CUDA: one launch per call.
//
// Why one launch: a DDP bucket holds up to a few hundred parameters, and a gather +
// copy per parameter costs two launches each, which dominates for the small ones. Here
// a table of per-tensor descriptors, uploaded with a non-blocking copy from pinned
// memory and ordered on the current stream (so the host never waits), lets a single
// kernel (pack_kernel.cuh) cover the whole call.
// Light headers on purpose: ATen/cuda/CUDAContext.h drags in cuBLAS/cuSPARSE headers,
// which some toolkits lack, and doubles the compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "pack_kernel.cuh"
#include "pack_plan.h"

namespace approxdist {
namespace {

using namespace cuda_kernel;

template <bool PACK>
void launch(const std::vector<at::Tensor>& grads, const Plan& plan, const at::Tensor& flat) {
  const int64_t es = flat.element_size();
  TORCH_CHECK(es == 1 || es == 2 || es == 4 || es == 8,
              "approxdist CUDA kernels support element sizes 1, 2, 4 and 8, got ", es);
  std::vector<TensorSpec> specs(plan.geoms.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const Geom& g = plan.geoms[i];
    specs[i] = TensorSpec{reinterpret_cast<uint64_t>(grads[i].data_ptr()),
                          g.dense ? 0 : reinterpret_cast<uint64_t>(plan.idx[i].data_ptr()),
                          g.offset, g.numel, g.cols, g.inner, g.k, g.dense};
  }
  int64_t blocks = 0;
  const std::vector<Desc> descs =
      make_descs(specs, reinterpret_cast<uint64_t>(flat.data_ptr()), es, &blocks);
  if (descs.empty()) return;
  TORCH_CHECK(blocks <= INT32_MAX, "approxdist pack: buffer too large for one launch");

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

void pack_cuda(const std::vector<at::Tensor>& grads, const Plan& plan, const at::Tensor& out) {
  launch<true>(grads, plan, out);
}

void unpack_cuda(const at::Tensor& flat, const std::vector<at::Tensor>& grads, const Plan& plan) {
  launch<false>(grads, plan, flat);
}

}  // namespace approxdist
