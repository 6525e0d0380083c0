// Geometry of a multi-tensor pack, shared by the CPU and CUDA implementations.
//
// Every gradient is viewed in its memory order as (rows, cols, inner) with the sampled
// dim 1 as cols. A contiguous (O, I, ...) tensor is (O, I, prod(rest)): its packed form
// is, row by row, the selected columns' inner slices in index order, which is exactly
// `g.index_select(1, idx).reshape(-1)`. A dim-1-major tensor (`g.transpose(0, 1)` is
// contiguous: the layout approxdist gives distributed sampled weights, so that a
// selected input channel is one block of memory) is (1, I, O*prod(rest)), and its packed
// form is `g.transpose(0, 1).index_select(0, idx).reshape(-1)`. A dense tensor (no
// indices, or k == cols) is packed whole in memory order. Packed tensors follow one
// another in list order.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace approxdist {

struct Geom {
  int64_t rows = 1;
  int64_t cols = 1;
  int64_t inner = 1;
  int64_t k = 1;          // selected columns (== cols when dense)
  bool dense = true;      // copied whole: no indices, or every column selected
  int64_t numel = 0;      // elements of the packed slice
  int64_t offset = 0;     // element offset of the packed slice in the flat buffer
};

struct Plan {
  std::vector<Geom> geoms;
  std::vector<at::Tensor> idx;  // contiguous indices; undefined for dense tensors
  int64_t numel = 0;            // of the flat buffer
};

// All the structural checks of pack/unpack (metadata only, no data read), with the
// messages of the Python face (checks.py): the compiled path skips the Python checks,
// whose per-tensor cost is larger than a GPU kernel's run time for a whole bucket.
// True when g.transpose(0, 1) is contiguous (size-1 dims' strides do not matter, as in
// is_contiguous). Checked on the strides: a transpose() per tensor costs a dispatch.
inline bool dim1_major(const at::Tensor& g) {
  const int64_t nd = g.dim();
  if (nd < 2) return false;
  int64_t expected = 1;
  for (int64_t d = nd - 1; d >= 0; --d) {
    const int64_t dim = d == 0 ? 1 : (d == 1 ? 0 : d);
    const int64_t size = g.size(dim);
    if (size == 0) return true;
    if (size != 1 && g.stride(dim) != expected) return false;
    expected *= size;
  }
  return true;
}

inline Plan make_plan(const std::vector<at::Tensor>& grads,
                      const std::vector<std::optional<at::Tensor>>& indices) {
  TORCH_CHECK_VALUE(grads.size() == indices.size(),
                    "grads and indices must have the same length, got ", grads.size(), " and ",
                    indices.size());
  Plan plan;
  plan.geoms.resize(grads.size());
  plan.idx.resize(grads.size());
  int64_t offset = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(g.defined(), "grads[", i, "] must be a tensor");
    if (i > 0) {
      TORCH_CHECK_VALUE(g.scalar_type() == grads[0].scalar_type(), "grads[", i, "] has dtype ",
                        g.scalar_type(), " but grads[0] has ", grads[0].scalar_type(),
                        ": pack one dtype group per call");
      TORCH_CHECK_VALUE(g.device() == grads[0].device(), "grads[", i, "] is on ", g.device(),
                        " but grads[0] is on ", grads[0].device());
    }
    const bool rows_major = g.is_contiguous();
    TORCH_CHECK_VALUE(rows_major || dim1_major(g), "grads[", i,
                      "] must be contiguous or dim-1-major (shape ", g.sizes(), ", stride ",
                      g.strides(), "): the packed layout follows its memory order");
    Geom& p = plan.geoms[i];
    const bool has_idx = indices[i].has_value() && indices[i]->defined();
    if (has_idx) {
      const at::Tensor& idx = *indices[i];
      TORCH_CHECK_VALUE(g.dim() >= 2, "indices[", i, "] must be None for the ", g.dim(),
                        "-D tensor grads[", i, "]: only dim 1 of a matrix or conv weight is sampled");
      TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong && idx.dim() == 1, "indices[", i,
                        "] must be a 1-D int64 tensor, got ", idx.dim(), "-D ", idx.scalar_type());
      TORCH_CHECK_VALUE(idx.device() == g.device(), "indices[", i, "] is on ", idx.device(),
                        " but grads[", i, "] is on ", g.device());
      p.rows = rows_major ? g.size(0) : 1;
      p.cols = g.size(1);
      p.inner = p.rows * p.cols == 0 ? 0 : g.numel() / (p.rows * p.cols);
      p.k = idx.numel();
      TORCH_CHECK_VALUE(p.k <= p.cols, "indices[", i, "] has ", p.k, " entries but grads[", i,
                        "] has only ", p.cols, " positions along dim 1");
      // A sorted, duplicate-free, in-range set of cols entries is every column.
      p.dense = p.k == p.cols;
      p.numel = p.rows * p.k * p.inner;
      plan.idx[i] = idx.contiguous();
    } else {
      p.rows = 1;
      p.cols = g.numel();
      p.inner = 1;
      p.k = p.cols;
      p.dense = true;
      p.numel = g.numel();
    }
    p.offset = offset;
    offset += p.numel;
  }
  plan.numel = offset;
  return plan;
}

}  // namespace approxdist
