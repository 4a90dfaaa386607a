// A 3x3 'SAME' convolution of 0/1 spikes that skips the zeros: an XLA:CPU FFI custom call.
//
//   out[n, y, x, :] = sum over taps (dy, dx) and channels c with x[n, y+dy-1, x+dx-1, c] != 0
//                     of w[dy, dx, c, :]
//
// A spike map is 90-98 % zeros (the seed's sparsity table), so instead of a dense product this
// adds, per output position, only the kernel rows of the active inputs around it. Two phases,
// both split over XLA's intra-op thread pool:
//   1. per input position, the list of its active channels (uint16 indices, in order);
//   2. per output position and tile of output channels, a register accumulator that adds the
//      rows w[tap, c, tile] of the listed channels, taps in row-major order, channels ascending.
// Inputs that are not 0/1 are treated as 0 where 0 and as 1 elsewhere: the caller
// (bitnet_jax/spike_conv.py) only passes spikes.
//
// Built by bitnet_jax/spike_conv.py with the host's C++ compiler (-O3 -march=native).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(i) for i in [0, n) on the caller and the pool's threads; returns when all are done.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, F body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, body]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      state->done.fetch_add(1);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load() < n) std::this_thread::yield();
}

// 64 bytes of T: one AVX-512 register (the compiler splits it where the CPU has less).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int kLanes = 64 / sizeof(T);
  static type Load(const T* p) { type v; std::memcpy(&v, p, sizeof v); return v; }
  static void Store(T* p, type v) { std::memcpy(p, &v, sizeof v); }
};

struct Geometry {
  int64_t n, h, w, ci, co;
};

// Adds, for output position (b, y, x), the kernel columns [c0, c0 + K * lanes) of every active
// input around it. K vectors stay in registers.
template <typename T, int K>
void AccumulateTile(const Geometry& g, const T* kernel, const uint16_t* lists,
                    const uint16_t* counts, int64_t b, int64_t y, int64_t x, int64_t c0,
                    T* out) {
  using V = Vec<T>;
  typename V::type acc[K];
  for (int k = 0; k < K; ++k) acc[k] = typename V::type{};
  for (int64_t dy = 0; dy < 3; ++dy) {
    int64_t yy = y + dy - 1;
    if (yy < 0 || yy >= g.h) continue;
    for (int64_t dx = 0; dx < 3; ++dx) {
      int64_t xx = x + dx - 1;
      if (xx < 0 || xx >= g.w) continue;
      int64_t q = (b * g.h + yy) * g.w + xx;
      const uint16_t* list = lists + q * g.ci;
      const T* tap = kernel + (dy * 3 + dx) * g.ci * g.co + c0;
      for (int64_t j = 0, m = counts[q]; j < m; ++j) {
        const T* row = tap + list[j] * g.co;
        for (int k = 0; k < K; ++k) acc[k] += V::Load(row + k * V::kLanes);
      }
    }
  }
  for (int k = 0; k < K; ++k) V::Store(out + c0 + k * V::kLanes, acc[k]);
}

// The same for the last columns [c0, co) that fill no whole vector.
template <typename T>
void AccumulateScalar(const Geometry& g, const T* kernel, const uint16_t* lists,
                      const uint16_t* counts, int64_t b, int64_t y, int64_t x, int64_t c0,
                      T* out) {
  for (int64_t c = c0; c < g.co; ++c) out[c] = 0;
  for (int64_t dy = 0; dy < 3; ++dy) {
    int64_t yy = y + dy - 1;
    if (yy < 0 || yy >= g.h) continue;
    for (int64_t dx = 0; dx < 3; ++dx) {
      int64_t xx = x + dx - 1;
      if (xx < 0 || xx >= g.w) continue;
      int64_t q = (b * g.h + yy) * g.w + xx;
      const uint16_t* list = lists + q * g.ci;
      const T* tap = kernel + (dy * 3 + dx) * g.ci * g.co;
      for (int64_t j = 0, m = counts[q]; j < m; ++j) {
        const T* row = tap + list[j] * g.co;
        for (int64_t c = c0; c < g.co; ++c) out[c] += row[c];
      }
    }
  }
}

template <typename T>
void SpikeConv(ffi::ThreadPool& pool, const Geometry& g, const T* x, const T* kernel, T* out) {
  using V = Vec<T>;
  const int64_t positions = g.n * g.h * g.w;
  // Scratch reused between calls (one per calling thread), so no page faults per call.
  thread_local std::vector<uint16_t> lists, counts;
  lists.resize(positions * g.ci);
  counts.resize(positions);
  uint16_t* list_data = lists.data();
  uint16_t* count_data = counts.data();

  const int64_t block = 64;  // positions per task
  const int64_t blocks = (positions + block - 1) / block;
  ParallelFor(pool, blocks, [&](int64_t i) {
    for (int64_t p = i * block, end = std::min(positions, p + block); p < end; ++p) {
      const T* in = x + p * g.ci;
      uint16_t* list = list_data + p * g.ci;
      int64_t m = 0;
      for (int64_t c = 0; c < g.ci; ++c) {
        list[m] = static_cast<uint16_t>(c);
        m += in[c] != T(0);
      }
      count_data[p] = static_cast<uint16_t>(m);
    }
  });
  ParallelFor(pool, blocks, [&](int64_t i) {
    for (int64_t p = i * block, end = std::min(positions, p + block); p < end; ++p) {
      const int64_t b = p / (g.h * g.w), y = (p / g.w) % g.h, xpos = p % g.w;
      T* o = out + p * g.co;
      int64_t c0 = 0;
      for (; c0 + 4 * V::kLanes <= g.co; c0 += 4 * V::kLanes)
        AccumulateTile<T, 4>(g, kernel, list_data, count_data, b, y, xpos, c0, o);
      for (; c0 + V::kLanes <= g.co; c0 += V::kLanes)
        AccumulateTile<T, 1>(g, kernel, list_data, count_data, b, y, xpos, c0, o);
      if (c0 < g.co) AccumulateScalar<T>(g, kernel, list_data, count_data, b, y, xpos, c0, o);
    }
  });
}

template <ffi::DataType D>
ffi::Error SpikeConvHandler(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D> kernel,
                            ffi::ResultBuffer<D> out) {
  auto xd = x.dimensions(), kd = kernel.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || od.size() != 4)
    return ffi::Error::InvalidArgument("spike_conv: expected (N, H, W, Ci) spikes, a (3, 3, Ci, "
                                       "Co) kernel and an (N, H, W, Co) output");
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[3]};
  if (kd[0] != 3 || kd[1] != 3 || kd[2] != g.ci || od[0] != g.n || od[1] != g.h ||
      od[2] != g.w || od[3] != g.co)
    return ffi::Error::InvalidArgument("spike_conv: shapes do not match (N, H, W, Ci) x "
                                       "(3, 3, Ci, Co) -> (N, H, W, Co)");
  if (g.ci > 65535)
    return ffi::Error::InvalidArgument("spike_conv: at most 65535 input channels");
  SpikeConv(pool, g, x.typed_data(), kernel.typed_data(), out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeConvF32, SpikeConvHandler<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeConvF64, SpikeConvHandler<ffi::F64>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Arg<ffi::Buffer<ffi::F64>>()
                                  .Ret<ffi::Buffer<ffi::F64>>());
