// Runs pack_kernel.cuh's CUDA kernel on the host, one (block, thread) at a time, and
// compares it with a plain loop. Machines without a GPU (most CI, the dev box) would
// otherwise never execute the kernel's index arithmetic: the fast division, the
// stepping across inner slices/columns/rows, the block-to-tensor search and the
// aligned/unaligned vector paths. Serial execution is a valid schedule here because
// the kernel's only barrier follows the one shared-memory write (by thread 0).
//
// Build: g++ -std=c++17 -O1 -I csrc csrc/emulate/pack_kernel_host.cpp
// Usage: a.out SEED CASES     prints "ok <cases> <elements>" or the first mismatch.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

// CUDA surface used by the kernel, emulated.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __syncthreads()
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
static Dim3 blockIdx, threadIdx;
static inline uint32_t __umulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

#include "pack_kernel.cuh"

using namespace approxdist::cuda_kernel;

namespace {

std::mt19937_64 rng;

int64_t uniform(int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

struct Tensor {
  std::vector<unsigned char> storage;  // over-allocated so data can be misaligned on purpose
  unsigned char* data = nullptr;
  int64_t rows = 1, cols = 0, inner = 1;
  std::vector<int64_t> idx;
  bool has_idx = false;
};

std::vector<int64_t> make_index(int kind, int64_t n) {
  std::vector<int64_t> out;
  if (n == 0 || kind == 0) return out;                     // empty
  if (kind == 1) {                                          // all
    for (int64_t i = 0; i < n; ++i) out.push_back(i);
  } else if (kind == 2) {                                   // single
    out.push_back(uniform(0, n - 1));
  } else {                                                  // runs / scattered
    std::vector<char> mask(n, 0);
    if (kind == 3) {
      for (int r = 0; r < 3; ++r) {
        int64_t s = uniform(0, n - 1), len = uniform(1, std::max<int64_t>(1, n / 3));
        for (int64_t i = s; i < std::min(n, s + len); ++i) mask[i] = 1;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) mask[i] = uniform(0, 2) == 0;
    }
    for (int64_t i = 0; i < n; ++i)
      if (mask[i]) out.push_back(i);
  }
  return out;
}

template <int SIZE, bool PACK>
void emulate(const std::vector<Desc>& descs, int64_t blocks, char* flat) {
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    for (unsigned t = 0; t < static_cast<unsigned>(kThreads); ++t) {
      threadIdx.x = t;
      pack_kernel<SIZE, PACK>(descs.data(), static_cast<int>(descs.size()), flat);
    }
  }
}

template <bool PACK>
void emulate_es(int64_t es, const std::vector<Desc>& descs, int64_t blocks, char* flat) {
  switch (es) {
    case 1: emulate<1, PACK>(descs, blocks, flat); break;
    case 2: emulate<2, PACK>(descs, blocks, flat); break;
    case 4: emulate<4, PACK>(descs, blocks, flat); break;
    default: emulate<8, PACK>(descs, blocks, flat); break;
  }
}

bool check_fastdiv() {
  std::vector<uint32_t> divisors = {1, 2, 3, 7, 9, 25, 49, 64, 1000, 65535, 65536, 65537,
                                    (1u << 31) - 1, (1u << 30) + 1};
  for (int i = 0; i < 2000; ++i) divisors.push_back(static_cast<uint32_t>(uniform(1, (1ll << 31) - 1)));
  for (int i = 0; i < 2000; ++i) divisors.push_back(static_cast<uint32_t>(uniform(1, 5000)));
  for (uint32_t d : divisors) {
    const FastDiv f = FastDiv::make(d);
    std::vector<uint32_t> ns = {0, 1, d - 1, d, d + 1, (1u << 31) - 1, (1u << 31) - 2};
    for (int i = 0; i < 500; ++i) ns.push_back(static_cast<uint32_t>(uniform(0, (1ll << 31) - 1)));
    for (uint32_t n : ns) {
      if (n >= (1u << 31)) continue;
      uint32_t q, r;
      f.divmod(n, q, r);
      if (q != n / d || r != n % d) {
        std::printf("fastdiv mismatch: n=%u d=%u got %u,%u\n", n, d, q, r);
        return false;
      }
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 0;
  const int cases = argc > 2 ? std::atoi(argv[2]) : 200;
  rng.seed(seed);
  if (!check_fastdiv()) return 1;
  const int inners[] = {1, 2, 3, 9, 25, 49};
  int64_t total = 0;
  for (int c = 0; c < cases; ++c) {
    const int64_t es = int64_t(1) << uniform(0, 3);
    const bool force_wide = uniform(0, 3) == 0;
    const int nt = static_cast<int>(uniform(1, 8));
    std::vector<Tensor> ts(nt);
    std::vector<TensorSpec> specs;
    int64_t offset = 0;
    for (Tensor& t : ts) {
      const int shape = static_cast<int>(uniform(0, 4));
      if (shape == 0) {  // dense 1-D
        t.cols = uniform(0, 3000);
      } else {
        t.rows = uniform(0, 20);
        t.cols = uniform(1, 70);
        t.inner = inners[uniform(0, 5)];
        t.idx = make_index(static_cast<int>(uniform(0, 4)), t.cols);
        t.has_idx = true;
      }
      const int64_t numel = t.rows * t.cols * t.inner;
      const int64_t shift = uniform(0, 3) * es;  // misaligns data on purpose at times
      t.storage.resize(numel * es + 32);
      t.data = t.storage.data() + (16 - reinterpret_cast<uintptr_t>(t.storage.data()) % 16) % 16 + shift;
      for (int64_t i = 0; i < numel * es; ++i) t.data[i] = static_cast<unsigned char>(rng());
      const bool dense = !t.has_idx || static_cast<int64_t>(t.idx.size()) == t.cols;
      const int64_t k = t.has_idx ? static_cast<int64_t>(t.idx.size()) : t.cols;
      const int64_t pn = t.rows * k * t.inner;
      specs.push_back(TensorSpec{reinterpret_cast<uint64_t>(t.data),
                                 dense ? 0 : reinterpret_cast<uint64_t>(t.idx.data()), offset, pn,
                                 t.has_idx ? t.cols : t.cols, t.has_idx ? t.inner : 1,
                                 t.has_idx ? k : t.cols, dense});
      if (!t.has_idx) specs.back().inner = 1;
      offset += pn;
    }
    // Reference pack.
    std::vector<unsigned char> expect(offset * es + 1);
    int64_t pos = 0;
    for (const Tensor& t : ts) {
      if (!t.has_idx) {
        std::memcpy(expect.data() + pos * es, t.data, t.cols * es);
        pos += t.cols;
        continue;
      }
      for (int64_t r = 0; r < t.rows; ++r)
        for (int64_t j : t.idx) {
          std::memcpy(expect.data() + pos * es, t.data + ((r * t.cols + j) * t.inner) * es, t.inner * es);
          pos += t.inner;
        }
    }
    std::vector<unsigned char> flat_storage(offset * es + 64, 0xAB);
    const int64_t fshift = uniform(0, 2) * es;
    char* flat = reinterpret_cast<char*>(flat_storage.data()) +
                 (16 - reinterpret_cast<uintptr_t>(flat_storage.data()) % 16) % 16 + fshift;
    int64_t blocks = 0;
    const std::vector<Desc> descs =
        make_descs(specs, reinterpret_cast<uint64_t>(flat), es, &blocks, force_wide);
    if (!descs.empty()) emulate_es<true>(es, descs, blocks, flat);
    if (offset && std::memcmp(flat, expect.data(), offset * es) != 0) {
      std::printf("pack mismatch: case %d es %lld wide %d\n", c, (long long)es, force_wide);
      return 1;
    }
    // Unpack a fresh random payload; compare with the loop's scatter on copies.
    std::vector<std::vector<unsigned char>> want(nt);
    for (int i = 0; i < nt; ++i) {
      const Tensor& t = ts[i];
      want[i].assign(t.data, t.data + t.rows * t.cols * t.inner * es);
    }
    for (int64_t i = 0; i < offset * es; ++i) flat[i] = static_cast<char>(rng());
    pos = 0;
    for (int i = 0; i < nt; ++i) {
      const Tensor& t = ts[i];
      if (!t.has_idx) {
        std::memcpy(want[i].data(), flat + pos * es, t.cols * es);
        pos += t.cols;
        continue;
      }
      for (int64_t r = 0; r < t.rows; ++r)
        for (int64_t j : t.idx) {
          std::memcpy(want[i].data() + ((r * t.cols + j) * t.inner) * es, flat + pos * es, t.inner * es);
          pos += t.inner;
        }
    }
    if (!descs.empty()) emulate_es<false>(es, descs, blocks, flat);
    for (int i = 0; i < nt; ++i) {
      if (!want[i].empty() && std::memcmp(want[i].data(), ts[i].data, want[i].size()) != 0) {
        std::printf("unpack mismatch: case %d tensor %d es %lld wide %d\n", c, i, (long long)es, force_wide);
        return 1;
      }
    }
    total += offset;
  }
  std::printf("ok %d %lld\n", cases, static_cast<long long>(total));
  return 0;
}
