// Multi-tensor pack/unpack of sampled gradient slices on the CPU, and the Python module.
//
// Why not index_select + cat: per tensor that is an allocation, a strided gather that
// recomputes a 64-bit offset per element, and a second copy into the bucket. Here each
// tensor's index set is turned once into runs of consecutive columns; a run of a row is
// one memcpy when it is long, a typed gather loop when the runs are short (top-k
// indices of a 1x1 conv are mostly isolated). Work is split into items of about
// kItemBytes (a block of rows of one tensor, or a chunk of a dense tensor) that the
// intra-op threads claim one at a time.
// Not <torch/extension.h>: it pulls in the whole C++ frontend and triples the first-use
// compile time; the pybind casters for at::Tensor are all this module needs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#define APPROXDIST_STREAM 1
#else
#define APPROXDIST_STREAM 0
#endif

#include "pack_plan.h"

namespace approxdist {

#ifdef APPROXDIST_WITH_CUDA
void pack_cuda(const std::vector<at::Tensor>& grads, const Plan& plan, const at::Tensor& out);
void unpack_cuda(const at::Tensor& flat, const std::vector<at::Tensor>& grads, const Plan& plan);
#endif

namespace {

constexpr int64_t kItemBytes = 256 * 1024;
constexpr int64_t kMemcpyBytes = 128;  // up to this, inline vector moves beat a memcpy call
// A pack or unpack moving at least this much uses non-temporal (streaming) stores for its
// long blocks: the data is far larger than the caches, so the written lines need not be
// read in first and are not worth keeping; that made unpack ~30% faster on the resnet50
// set. Smaller jobs keep normal stores, so their result is still in cache when read.
constexpr int64_t kStreamBytes = 4 << 20;
constexpr int64_t kStreamMinBytes = 256;  // shorter pieces keep normal stores (alignment head/tail)

struct Run {
  int64_t src;  // first column in the tensor
  int64_t dst;  // first column in the packed row
  int64_t len;  // columns
};

struct TensorJob {
  char* data = nullptr;
  char* flat = nullptr;  // start of this tensor's packed slice
  const int64_t* idx = nullptr;
  Geom geom;
  std::vector<Run> runs;
  bool gather = false;  // inner == 1 with short runs: element-wise gather over idx
  bool by_runs = false;  // a single row (dim-1-major tensor): items are ranges of runs
  bool stream = false;  // non-temporal stores for long blocks (see kStreamBytes)
};

struct Item {
  int32_t job;
  int64_t begin;  // rows (sampled), runs (sampled, one row) or elements (dense)
  int64_t end;
};

// Also the memory-safety check of the C++ path: the runs are built from the indices, so
// rejecting unsorted, duplicate or out-of-range entries here costs O(k) per tensor.
void build_runs(TensorJob& job, size_t i) {
  const int64_t k = job.geom.k;
  const int64_t cols = job.geom.cols;
  const int64_t* idx = job.idx;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t c = idx[j];
    TORCH_CHECK_VALUE(c >= 0 && c < cols, "indices[", i, "] has entry ", c,
                      " out of range [0, ", cols, ")");
    if (j > 0) {
      TORCH_CHECK_VALUE(c > idx[j - 1], "indices[", i,
                        "] must be sorted and free of duplicates (entry ", j, ")");
    }
    if (!job.runs.empty() && job.runs.back().src + job.runs.back().len == c) {
      job.runs.back().len += 1;
    } else {
      job.runs.push_back(Run{c, j, 1});
    }
  }
  job.gather = job.geom.inner == 1 && static_cast<int64_t>(job.runs.size()) * 4 > k;
}

template <typename T>
inline void copy_small(char* dst, const char* src, int64_t n) {
  T* d = reinterpret_cast<T*>(dst);
  const T* s = reinterpret_cast<const T*>(src);
  for (int64_t i = 0; i < n; ++i) d[i] = s[i];
}

inline void copy16(char* dst, const char* src) { std::memcpy(dst, src, 16); }

// memcpy with non-temporal stores once dst is 16-byte aligned. The caller issues an
// sfence before the data is read by another thread (end of run_cpu's worker).
inline void stream_copy(char* dst, const char* src, int64_t n) {
#if APPROXDIST_STREAM
  const int64_t head = std::min<int64_t>(n, (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15);
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  std::memcpy(dst + i, src + i, n - i);
#else
  std::memcpy(dst, src, n);
#endif
}

// Slices of a 3x3 conv are 18-36 bytes, runs of them a few times that: too short for a
// memcpy call to pay off. 16..128 bytes are moved as (possibly overlapping) 16-byte
// blocks, which compile to unaligned vector moves; src and dst never overlap.
inline void copy_bytes(char* dst, const char* src, int64_t nbytes, int64_t es, bool stream) {
  if (stream && nbytes >= kStreamMinBytes) {
    stream_copy(dst, src, nbytes);
  } else if (nbytes > kMemcpyBytes) {
    std::memcpy(dst, src, nbytes);
  } else if (nbytes >= 16) {
    int64_t i = 0;
    for (; i + 16 <= nbytes; i += 16) copy16(dst + i, src + i);
    if (i < nbytes) copy16(dst + nbytes - 16, src + nbytes - 16);
  } else {
    switch (es) {
      case 2: copy_small<uint16_t>(dst, src, nbytes / 2); break;
      case 4: copy_small<uint32_t>(dst, src, nbytes / 4); break;
      case 8: copy_small<uint64_t>(dst, src, nbytes / 8); break;
      default: std::memcpy(dst, src, nbytes);
    }
  }
}

// PACK: tensor -> flat; otherwise flat -> tensor. T only carries the element size.
template <typename T, bool PACK>
void gather_rows(const TensorJob& job, int64_t r0, int64_t r1) {
  const int64_t k = job.geom.k;
  const int64_t cols = job.geom.cols;
  const int64_t* idx = job.idx;
  T* data = reinterpret_cast<T*>(job.data);
  T* flat = reinterpret_cast<T*>(job.flat);
  int64_t r = r0;
  // Four rows at a time share each index load: a quarter of the index traffic and
  // four independent copies in flight.
  for (; r + 4 <= r1; r += 4) {
    T* t0 = data + r * cols;
    T* t1 = t0 + cols;
    T* t2 = t1 + cols;
    T* t3 = t2 + cols;
    T* f0 = flat + r * k;
    T* f1 = f0 + k;
    T* f2 = f1 + k;
    T* f3 = f2 + k;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t c = idx[j];
      if (PACK) {
        f0[j] = t0[c]; f1[j] = t1[c]; f2[j] = t2[c]; f3[j] = t3[c];
      } else {
        t0[c] = f0[j]; t1[c] = f1[j]; t2[c] = f2[j]; t3[c] = f3[j];
      }
    }
  }
  for (; r < r1; ++r) {
    T* trow = data + r * cols;
    T* frow = flat + r * k;
    for (int64_t j = 0; j < k; ++j) {
      if (PACK) {
        frow[j] = trow[idx[j]];
      } else {
        trow[idx[j]] = frow[j];
      }
    }
  }
}

// Runs [b0, b1) of one row: each run of consecutive selected columns is one copy.
template <bool PACK>
inline void copy_runs(const TensorJob& job, char* trow, char* frow, int64_t b0, int64_t b1,
                      int64_t es) {
  const int64_t inner_bytes = job.geom.inner * es;
  for (int64_t b = b0; b < b1; ++b) {
    const Run& run = job.runs[b];
    char* t = trow + run.src * inner_bytes;
    char* f = frow + run.dst * inner_bytes;
    if (PACK) {
      copy_bytes(f, t, run.len * inner_bytes, es, job.stream);
    } else {
      copy_bytes(t, f, run.len * inner_bytes, es, job.stream);
    }
  }
}

template <bool PACK>
void run_rows(const TensorJob& job, int64_t r0, int64_t r1, int64_t es) {
  const int64_t inner_bytes = job.geom.inner * es;
  const int64_t n_runs = static_cast<int64_t>(job.runs.size());
  for (int64_t r = r0; r < r1; ++r) {
    copy_runs<PACK>(job, job.data + r * job.geom.cols * inner_bytes,
                    job.flat + r * job.geom.k * inner_bytes, 0, n_runs, es);
  }
}

template <bool PACK>
void do_item(const TensorJob& job, const Item& item, int64_t es) {
  if (job.by_runs) {  // a dim-1-major tensor: one row, whose runs are split among items
    copy_runs<PACK>(job, job.data, job.flat, item.begin, item.end, es);
    return;
  }
  if (job.geom.dense) {
    char* t = job.data + item.begin * es;
    char* f = job.flat + item.begin * es;
    const int64_t n = (item.end - item.begin) * es;
    if (PACK) {
      copy_bytes(f, t, n, es, job.stream);
    } else {
      copy_bytes(t, f, n, es, job.stream);
    }
    return;
  }
  if (job.gather) {
    switch (es) {
      case 2: gather_rows<uint16_t, PACK>(job, item.begin, item.end); return;
      case 4: gather_rows<uint32_t, PACK>(job, item.begin, item.end); return;
      case 8: gather_rows<uint64_t, PACK>(job, item.begin, item.end); return;
      default: break;  // other sizes take the run path
    }
  }
  run_rows<PACK>(job, item.begin, item.end, es);
}

// The elements [begin, end) of the job's packed slice that an item wrote.
inline void item_range(const TensorJob& job, const Item& item, int64_t* begin, int64_t* end) {
  if (job.by_runs) {
    const Run& last = job.runs[item.end - 1];
    *begin = job.runs[item.begin].dst * job.geom.inner;
    *end = (last.dst + last.len) * job.geom.inner;
  } else if (job.geom.dense) {
    *begin = item.begin;
    *end = item.end;
  } else {
    *begin = item.begin * job.geom.k * job.geom.inner;
    *end = item.end * job.geom.k * job.geom.inner;
  }
}

// x / d per element, as torch's div_ by a Python number computes it: in the tensor's
// type for float and double, through float for the 16-bit types (IEEE division is
// exact, so the bits are div_'s). A power-of-two divisor (world sizes 2, 4, 8, ...) is
// applied as a multiplication by its reciprocal, which is exact, so every result
// (subnormals included) is the same correctly rounded quotient; a multiply is several
// times cheaper than a divide. In place (dst == src) right after an item is copied, while
// it is in cache, or fused into the copy of a long block: either way the hook saves a
// separate pass over the whole packed buffer.
#if APPROXDIST_STREAM
// float32 (the common gradient type) with non-temporal stores: x * f or x / f.
template <bool MUL>
void divide_copy_stream(float* d, const float* s, int64_t n, float f) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(d + i) & 15); ++i) d[i] = MUL ? s[i] * f : s[i] / f;
  const __m128 v = _mm_set1_ps(f);
  for (; i + 8 <= n; i += 8) {
    const __m128 a = _mm_loadu_ps(s + i);
    const __m128 b = _mm_loadu_ps(s + i + 4);
    _mm_stream_ps(d + i, MUL ? _mm_mul_ps(a, v) : _mm_div_ps(a, v));
    _mm_stream_ps(d + i + 4, MUL ? _mm_mul_ps(b, v) : _mm_div_ps(b, v));
  }
  for (; i < n; ++i) d[i] = MUL ? s[i] * f : s[i] / f;
}
#endif

template <typename T, typename Acc>
void divide_copy(char* dst, const char* src, int64_t n, double divisor, bool stream) {
  T* d = reinterpret_cast<T*>(dst);
  const T* s = reinterpret_cast<const T*>(src);
  int exponent = 0;
  const bool pow2 = std::frexp(divisor, &exponent) == 0.5;
#if APPROXDIST_STREAM
  if constexpr (std::is_same_v<T, float>) {
    if (stream && dst != src && n * static_cast<int64_t>(sizeof(float)) >= kStreamMinBytes) {
      if (pow2) {
        divide_copy_stream<true>(d, s, n, static_cast<float>(1.0 / divisor));
      } else {
        divide_copy_stream<false>(d, s, n, static_cast<float>(divisor));
      }
      return;
    }
  }
#endif
  if (pow2) {
    const Acc r = static_cast<Acc>(1.0 / divisor);
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<T>(static_cast<Acc>(s[i]) * r);
    return;
  }
  const Acc q = static_cast<Acc>(divisor);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<T>(static_cast<Acc>(s[i]) / q);
}

inline bool divides_in_kernel(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

void divide_range(char* dst, const char* src, int64_t n, at::ScalarType type, double divisor,
                  bool stream = false) {
  switch (type) {
    case at::kFloat: divide_copy<float, float>(dst, src, n, divisor, stream); break;
    case at::kDouble: divide_copy<double, double>(dst, src, n, divisor, stream); break;
    case at::kHalf: divide_copy<at::Half, float>(dst, src, n, divisor, stream); break;
    case at::kBFloat16: divide_copy<at::BFloat16, float>(dst, src, n, divisor, stream); break;
    default: TORCH_CHECK(false, "approxdist pack: cannot divide ", type, " in the kernel");
  }
}

// Packs an item and divides it. Long blocks (dense chunks, runs of a dim-1-major tensor)
// are divided as they are copied, one pass; the short pieces of row-major tensors are
// copied first and divided in place while in cache.
void pack_divided(const TensorJob& job, const Item& item, int64_t es, at::ScalarType type,
                  double divisor) {
  if (job.geom.dense) {
    divide_range(job.flat + item.begin * es, job.data + item.begin * es, item.end - item.begin,
                 type, divisor, job.stream);
    return;
  }
  if (job.by_runs) {
    const int64_t inner = job.geom.inner;
    for (int64_t b = item.begin; b < item.end; ++b) {
      const Run& run = job.runs[b];
      divide_range(job.flat + run.dst * inner * es, job.data + run.src * inner * es,
                   run.len * inner, type, divisor, job.stream);
    }
    return;
  }
  do_item<true>(job, item, es);
  int64_t begin = 0, end = 0;
  item_range(job, item, &begin, &end);
  char* p = job.flat + begin * es;
  divide_range(p, p, end - begin, type, divisor);
}

template <bool PACK>
void run_cpu(const std::vector<at::Tensor>& grads, const Plan& plan, const at::Tensor& flat,
             double divisor = 1.0) {
  const int64_t es = flat.element_size();
  const at::ScalarType type = flat.scalar_type();
  std::vector<TensorJob> jobs(grads.size());
  std::vector<Item> items;
  char* flat_base = static_cast<char*>(flat.data_ptr());
  const bool stream = APPROXDIST_STREAM && plan.numel * es >= kStreamBytes;
  for (size_t i = 0; i < grads.size(); ++i) {
    TensorJob& job = jobs[i];
    job.geom = plan.geoms[i];
    job.data = static_cast<char*>(grads[i].data_ptr());
    job.flat = flat_base + job.geom.offset * es;
    if (plan.idx[i].defined()) {
      job.idx = plan.idx[i].data_ptr<int64_t>();
      build_runs(job, i);
    }
    if (job.geom.numel == 0) continue;
    if (job.geom.dense) {
      const int64_t n = job.geom.numel;
      const int64_t step = std::max<int64_t>(1, kItemBytes / es);
      for (int64_t b = 0; b < n; b += step) {
        items.push_back(Item{static_cast<int32_t>(i), b, std::min(n, b + step)});
      }
    } else if (job.geom.rows == 1) {
      job.by_runs = true;
      const int64_t n_runs = static_cast<int64_t>(job.runs.size());
      int64_t begin = 0, bytes = 0;
      for (int64_t b = 0; b < n_runs; ++b) {
        bytes += job.runs[b].len * job.geom.inner * es;
        if (bytes >= kItemBytes || b + 1 == n_runs) {
          items.push_back(Item{static_cast<int32_t>(i), begin, b + 1});
          begin = b + 1;
          bytes = 0;
        }
      }
    } else {
      const int64_t row_bytes = job.geom.k * job.geom.inner * es;
      const int64_t step = std::max<int64_t>(1, kItemBytes / row_bytes);
      for (int64_t r = 0; r < job.geom.rows; r += step) {
        items.push_back(Item{static_cast<int32_t>(i), r, std::min(job.geom.rows, r + step)});
      }
    }
    // Row-major rows packed with a division are divided in place right after their copy
    // (pack_divided), re-reading it: those copies must stay in cache.
    job.stream = stream && (job.geom.dense || job.by_runs || !(PACK && divisor != 1.0));
  }
  // Items are claimed from a shared counter instead of the static split parallel_for
  // gives each thread: on a busy machine a descheduled thread would otherwise hold its
  // whole share while the others wait at the barrier.
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_items, 1, [&](int64_t, int64_t) {
    for (int64_t it = next.fetch_add(1); it < n_items; it = next.fetch_add(1)) {
      const TensorJob& job = jobs[items[it].job];
      if (PACK && divisor != 1.0) {
        pack_divided(job, items[it], es, type, divisor);
      } else {
        do_item<PACK>(job, items[it], es);
      }
    }
#if APPROXDIST_STREAM
    if (stream) _mm_sfence();  // streamed stores visible before the caller reads them
#endif
  });
}

void check_flat(const at::Tensor& flat, const std::vector<at::Tensor>& grads, int64_t numel,
                const char* name) {
  TORCH_CHECK_VALUE(flat.dim() == 1 && flat.is_contiguous(), name,
                    " must be a contiguous 1-D tensor, got shape ", flat.sizes());
  TORCH_CHECK_VALUE(flat.numel() == numel, name, " has ", flat.numel(),
                    " elements but the selection packs to ", numel);
  if (!grads.empty()) {
    TORCH_CHECK_VALUE(flat.scalar_type() == grads[0].scalar_type(), name, " has dtype ",
                      flat.scalar_type(), " but grads have ", grads[0].scalar_type());
    TORCH_CHECK_VALUE(flat.device() == grads[0].device(), name, " is on ", flat.device(),
                      " but grads are on ", grads[0].device());
  }
}

}  // namespace

at::Tensor pack(const std::vector<at::Tensor>& grads,
                const std::vector<std::optional<at::Tensor>>& indices,
                const std::optional<at::Tensor>& out_opt, double divisor) {
  TORCH_CHECK_VALUE(divisor > 0, "divisor must be > 0, got ", divisor);
  const Plan plan = make_plan(grads, indices);
  at::Tensor out;
  if (out_opt.has_value() && out_opt->defined()) {
    out = *out_opt;
    check_flat(out, grads, plan.numel, "out");
  } else {
    TORCH_CHECK_VALUE(!grads.empty(), "pack of an empty list needs out=");
    out = at::empty({plan.numel}, grads[0].options());
  }
  if (out.is_cuda()) {
#ifdef APPROXDIST_WITH_CUDA
    pack_cuda(grads, plan, out);
    if (divisor != 1.0) out.div_(divisor);
    return out;
#else
    TORCH_CHECK(false, "approxdist kernels were built without CUDA");
#endif
  }
  const bool fused = divides_in_kernel(out.scalar_type());
  run_cpu<true>(grads, plan, out, fused ? divisor : 1.0);
  if (!fused && divisor != 1.0) out.div_(divisor);
  return out;
}

void unpack(const at::Tensor& flat, const std::vector<at::Tensor>& grads,
            const std::vector<std::optional<at::Tensor>>& indices) {
  const Plan plan = make_plan(grads, indices);
  check_flat(flat, grads, plan.numel, "flat");
  if (flat.is_cuda()) {
#ifdef APPROXDIST_WITH_CUDA
    unpack_cuda(flat, grads, plan);
    return;
#else
    TORCH_CHECK(false, "approxdist kernels were built without CUDA");
#endif
  }
  run_cpu<false>(grads, plan, flat);
}

bool with_cuda() {
#ifdef APPROXDIST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace approxdist

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "approxdist: fused pack/unpack of sampled gradient slices";
  m.def("pack", &approxdist::pack, "pack selected slices of grads into out", py::arg("grads"),
        py::arg("indices"), py::arg("out") = py::none(), py::arg("divisor") = 1.0);
  m.def("unpack", &approxdist::unpack, "write flat back into the selected slices of grads",
        py::arg("flat"), py::arg("grads"), py::arg("indices"));
  m.def("with_cuda", &approxdist::with_cuda, "whether the CUDA kernels were compiled in");
}
