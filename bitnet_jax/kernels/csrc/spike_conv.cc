// A 3x3 'SAME' convolution of 0/1 spikes that skips the zeros: an XLA:CPU FFI custom call.
//
//   out[n, y, x, :] = sum over taps (dy, dx) and channels c with x[n, y+dy-1, x+dx-1, c] != 0
//                     of w[dy, dx, c, :]
//
// A spike map is 90-98 % zeros (the seed's sparsity table), so instead of a dense product this
// adds, per output position, only the kernel rows of the active inputs around it. Two phases,
// both split over XLA's intra-op thread pool:
//   1. per input position, the list of its active channels (uint16 indices, in order);
//   2. per output position and tile of output channels (8 AVX-512 vectors: 128 floats; measured
//      faster than 2, 4 or 16; fewer where a tile's kernel slice would not fit in L2), register
//      accumulators that add the rows w[tap, c, tile] of the listed channels, taps in row-major
//      order, channels ascending, from a copy of the kernel whose tiles are contiguous.
// Inputs that are not 0/1 are treated as 0 where 0 and as 1 elsewhere: the caller
// (bitnet_jax/spike_conv.py) only passes spikes. The same code, valued (each row times its
// input's value), computes the input gradient from the output's cotangent (BitnetSparseConv);
// SpikeKernelGrad computes the kernel gradient from the active inputs.
//
// Built by bitnet_jax/spike_conv.py with the host's C++ compiler (-O3 -march=native).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// n values of scratch in buf (kept between calls, so a call costs no page faults), starting on
// a 64-byte boundary: a vector load that straddles two cache lines costs two. (malloc aligns to
// 16 bytes only, so the scratch's alignment, and the kernels' speed, varied from run to run.)
template <typename T>
T* Aligned(std::vector<T>& buf, int64_t n) {
  constexpr int64_t kPad = 64 / sizeof(T);
  buf.resize(n + kPad);
  const auto address = reinterpret_cast<std::uintptr_t>(buf.data());
  return buf.data() + (-address % 64) / sizeof(T);
}

struct Geometry {
  int64_t n, h, w, ci, co;
};

// The active channels of every input position q: index[q * ci, q * ci + count[q]) in ascending
// order and, for a valued input (kValued), their values at the same places in `value` (null for
// spikes, whose active value is 1).
template <typename T>
struct Active {
  const uint16_t* index;
  const uint16_t* count;
  const T* value;
};

// Calls row_fn(row, v) for the kernel row w[tap, c, :] of every active input c around output
// position (b, y, x), v its value (1 for spikes): taps in row-major order, channels ascending.
template <bool kValued, typename T, typename F>
inline void ForActiveRows(const Geometry& g, const T* kernel, const Active<T>& a, int64_t b,
                          int64_t y, int64_t x, F row_fn) {
  for (int64_t dy = 0; dy < 3; ++dy) {
    int64_t yy = y + dy - 1;
    if (yy < 0 || yy >= g.h) continue;
    for (int64_t dx = 0; dx < 3; ++dx) {
      int64_t xx = x + dx - 1;
      if (xx < 0 || xx >= g.w) continue;
      int64_t q = (b * g.h + yy) * g.w + xx;
      const uint16_t* list = a.index + q * g.ci;
      const T* tap = kernel + (dy * 3 + dx) * g.ci * g.co;
      for (int64_t j = 0, m = a.count[q]; j < m; ++j) {
        if constexpr (kValued) row_fn(tap + list[j] * g.co, a.value[q * g.ci + j]);
        else row_fn(tap + list[j] * g.co, T(1));
      }
    }
  }
}

// Output columns [c0, c0 + K vectors) of position (b, y, x), written to out[0, K vectors), with
// K accumulators in registers.
// A valued input adds each row times its value (a spike's row is added as it is).
template <bool kValued, typename T, int K>
void AccumulateTile(const Geometry& g, const T* kernel, const Active<T>& a, int64_t b, int64_t y,
                    int64_t x, int64_t c0, T* out) {
  using V = Vec<T>;
  typename V::type acc[K];
  for (int k = 0; k < K; ++k) acc[k] = typename V::type{};
  ForActiveRows<kValued>(g, kernel + c0, a, b, y, x, [&](const T* row, T v) {
    if constexpr (kValued) {
      const typename V::type scale = typename V::type{} + v;
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) acc[k] += scale * V::Load(row + k * V::kLanes);
    } else {
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) acc[k] += V::Load(row + k * V::kLanes);
    }
  });
  for (int k = 0; k < K; ++k) V::Store(out + k * V::kLanes, acc[k]);
}

// Columns [c0, c1) that fill no whole vector, written to out[0, c1 - c0).
template <bool kValued, typename T>
void AccumulateScalar(const Geometry& g, const T* kernel, const Active<T>& a, int64_t b,
                      int64_t y, int64_t x, int64_t c0, int64_t c1, T* out) {
  const int64_t n = c1 - c0;
  for (int64_t c = 0; c < n; ++c) out[c] = 0;
  ForActiveRows<kValued>(g, kernel + c0, a, b, y, x, [&](const T* row, T v) {
    for (int64_t c = 0; c < n; ++c) out[c] += kValued ? v * row[c] : row[c];
  });
}

// Writes the indices of the nonzero entries of in[0, n) to list, in order, and (if values is not
// null) the entries themselves to values; returns how many. X is T, or bool (spikes kept as bool).
template <typename X, typename T>
uint16_t ActiveChannels(const X* in, int64_t n, uint16_t* list, T* values) {
  int64_t m = 0, c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VBMI2__)
  constexpr bool kFloat = std::is_same_v<X, float>, kBool = std::is_same_v<X, bool>;
  if constexpr (kFloat || kBool) {  // 16 channels at a time: compare, then compress the indices
    const __m256i step = _mm256_set1_epi16(16);
    __m256i index = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; c + 16 <= n; c += 16, index = _mm256_add_epi16(index, step)) {
      __mmask16 nz;
      if constexpr (kFloat) {
        const __m512 v = _mm512_loadu_ps(in + c);
        nz = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
        if (values != nullptr) _mm512_storeu_ps(values + m, _mm512_maskz_compress_ps(nz, v));
      } else {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + c));
        nz = _mm_test_epi8_mask(v, v);
      }
      // Compress in a register, then store all 16 (m <= c: the extra ones stay inside the row
      // and are overwritten or past the count). Zen 4's compress-to-memory is microcoded.
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(list + m),
                          _mm256_maskz_compress_epi16(nz, index));
      m += __builtin_popcount(nz);
    }
  }
#endif
  for (; c < n; ++c) {
    list[m] = static_cast<uint16_t>(c);
    if (values != nullptr) values[m] = static_cast<T>(in[c]);
    m += in[c] != X(0);
  }
  return static_cast<uint16_t>(m);
}

// Per input position, its active channels (and, if kValued, their values), in scratch reused
// between calls (one per calling thread), so that a call costs no page faults.
template <bool kValued, typename T>
Active<T> BuildLists(ffi::ThreadPool& pool, const Geometry& g, const T* x) {
  const int64_t positions = g.n * g.h * g.w;
  thread_local std::vector<uint16_t> list_buf, count_buf;
  thread_local std::vector<T> value_buf;
  uint16_t* list_data = Aligned(list_buf, positions * g.ci);
  uint16_t* count_data = Aligned(count_buf, positions);
  T* value_data = kValued ? Aligned(value_buf, positions * g.ci) : nullptr;
  const int64_t block = 64;
  ParallelFor(pool, (positions + block - 1) / block, [&](int64_t i) {
    for (int64_t p = i * block, end = std::min(positions, p + block); p < end; ++p)
      count_data[p] = ActiveChannels(x + p * g.ci, g.ci, list_data + p * g.ci,
                                     kValued ? value_data + p * g.ci : nullptr);
  });
  return {list_data, count_data, value_data};
}

// Columns [c0, c1) of output position (b, y, x), the synapse without its bias, to out[0, c1 - c0).
template <bool kValued, typename T>
inline void Accumulate(const Geometry& g, const T* kernel, const Active<T>& a, int64_t b,
                       int64_t y, int64_t x, int64_t c0, int64_t c1, T* out) {
  constexpr int64_t L = Vec<T>::kLanes;
  int64_t c = c0;
  for (; c + 8 * L <= c1; c += 8 * L)
    AccumulateTile<kValued, T, 8>(g, kernel, a, b, y, x, c, out + (c - c0));
  for (; c + 4 * L <= c1; c += 4 * L)
    AccumulateTile<kValued, T, 4>(g, kernel, a, b, y, x, c, out + (c - c0));
  for (; c + L <= c1; c += L)
    AccumulateTile<kValued, T, 1>(g, kernel, a, b, y, x, c, out + (c - c0));
  if (c < c1) AccumulateScalar<kValued, T>(g, kernel, a, b, y, x, c, c1, out + (c - c0));
}

// Accumulate for `steps` consecutive time steps of one position: step k reads image k * n + b of
// the lists and writes z[k * stride, ...). Tap-major, then steps: a tap's input position has the
// same active channels at many steps (a neuron that fires keeps firing), so the kernel rows that
// one step loads from L2 are still in L1 for the next steps. The accumulators go through L1
// between taps; each output's sum keeps Accumulate's order (taps row-major, channels ascending),
// so the result is bitwise the same.
template <typename T, int K>
void AccumulateTileSteps(const Geometry& g, const T* kernel, const Active<T>& a, int64_t b,
                         int64_t y, int64_t x, int64_t c0, int64_t steps, T* z, int64_t stride) {
  using V = Vec<T>;
  for (int64_t k = 0; k < steps; ++k)
    for (int j = 0; j < K; ++j) V::Store(z + k * stride + j * V::kLanes, typename V::type{});
  for (int64_t dy = 0; dy < 3; ++dy) {
    const int64_t yy = y + dy - 1;
    if (yy < 0 || yy >= g.h) continue;
    for (int64_t dx = 0; dx < 3; ++dx) {
      const int64_t xx = x + dx - 1;
      if (xx < 0 || xx >= g.w) continue;
      const T* tap = kernel + (dy * 3 + dx) * g.ci * g.co + c0;
      for (int64_t k = 0; k < steps; ++k) {
        const int64_t q = ((k * g.n + b) * g.h + yy) * g.w + xx;
        const int64_t m = a.count[q];
        if (m == 0) continue;
        const uint16_t* list = a.index + q * g.ci;
        T* out = z + k * stride;
        typename V::type acc[K];
        for (int j = 0; j < K; ++j) acc[j] = V::Load(out + j * V::kLanes);
        for (int64_t i = 0; i < m; ++i) {
          const T* row = tap + list[i] * g.co;
#pragma GCC unroll 8
          for (int j = 0; j < K; ++j) acc[j] += V::Load(row + j * V::kLanes);
        }
        for (int j = 0; j < K; ++j) V::Store(out + j * V::kLanes, acc[j]);
      }
    }
  }
}

template <typename T>
void AccumulateScalarSteps(const Geometry& g, const T* kernel, const Active<T>& a, int64_t b,
                           int64_t y, int64_t x, int64_t c0, int64_t c1, int64_t steps, T* z,
                           int64_t stride) {
  for (int64_t k = 0; k < steps; ++k)
    AccumulateScalar<false>(g, kernel, a, k * g.n + b, y, x, c0, c1, z + k * stride);
}

// Columns [c0, c1) of position (b, y, x) at `steps` steps, the synapse without its bias, to
// z[k * stride, k * stride + c1 - c0) for step k.
template <typename T>
inline void AccumulateSteps(const Geometry& g, const T* kernel, const Active<T>& a, int64_t b,
                            int64_t y, int64_t x, int64_t c0, int64_t c1, int64_t steps, T* z,
                            int64_t stride) {
  constexpr int64_t L = Vec<T>::kLanes;
  int64_t c = c0;
  for (; c + 8 * L <= c1; c += 8 * L)
    AccumulateTileSteps<T, 8>(g, kernel, a, b, y, x, c, steps, z + (c - c0), stride);
  for (; c + 4 * L <= c1; c += 4 * L)
    AccumulateTileSteps<T, 4>(g, kernel, a, b, y, x, c, steps, z + (c - c0), stride);
  for (; c + L <= c1; c += L)
    AccumulateTileSteps<T, 1>(g, kernel, a, b, y, x, c, steps, z + (c - c0), stride);
  if (c < c1)
    AccumulateScalarSteps<T>(g, kernel, a, b, y, x, c, c1, steps, z + (c - c0), stride);
}

// Output channels go in tiles of 8 vectors (128 floats), narrowed (64, 32, ... floats) until a
// tile's kernel slice, 9 * ci * tile values, fits in TileBytes() of the L2 cache. A tile's slice
// is read from a tile-major copy of the kernel (in scratch reused between calls): in HWIO its
// rows are co values apart and map onto only tile / co of the cache sets; in the copy, tile t's
// 9 * ci rows of its width are contiguous from 9 * ci * t * tile. Two full tiles (co = 256
// floats) read the kernel in place (copying them was slower in interleaved A/B runs: layer 3 of
// the benchmark); more than two do not (layer 4's 512 outputs in tiles of 128, read in place:
// 110 ms where the copy took 44).
//
// 5/8 of the core's L2 (the rest for the lists and outputs): 640 KB on Zen 4 (1 MB), 1.25 MB on
// the Xeons with 2 MB, where the wider tiles halved the input gradient of layer 4 (ci = 512:
// tiles of 64 floats, not 32). 1 MB is assumed where the system does not say.
int64_t TileBytes() {
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (l2 <= 0) l2 = 1 << 20;
    return std::clamp<int64_t>(l2, 256 << 10, 4 << 20) * 5 / 8;
  }();
  return bytes;
}

// What Accumulate needs for the tile [c0, c1): its geometry, kernel and first column in them.
template <typename T>
struct TileView {
  Geometry g;
  const T* kernel;
  int64_t c0;
};

template <typename T>
class Tiles {
 public:
  Tiles(ffi::ThreadPool& pool, const Geometry& g, const T* kernel) : g_(g), kernel_(kernel) {
    constexpr int64_t L = Vec<T>::kLanes;
    if (kernel == nullptr) return;  // the neuron alone: no synapse
    while (width_ > L && 9 * g.ci * width_ * int64_t(sizeof(T)) > TileBytes()) width_ /= 2;
    if (width_ >= g.co || (width_ == 8 * L && g.co <= 2 * width_)) return;
    thread_local std::vector<T> copy;
    T* dst = Aligned(copy, 9 * g.ci * g.co);
    ParallelFor(pool, count(), [&](int64_t t) {
      const int64_t c0 = t * width_, w = std::min(g.co, c0 + width_) - c0;
      for (int64_t row = 0; row < 9 * g.ci; ++row)
        std::memcpy(dst + 9 * g.ci * c0 + row * w, kernel + row * g.co + c0, w * sizeof(T));
    });
    kernel_ = dst;
    copied_ = true;
  }
  int64_t width() const { return width_; }
  int64_t count() const { return (g_.co + width_ - 1) / width_; }
  TileView<T> View(int64_t c0, int64_t c1) const {
    if (!copied_) return {g_, kernel_, c0};
    Geometry tile_g = g_;
    tile_g.co = c1 - c0;  // the copy's rows are the tile's width long
    return {tile_g, kernel_ + 9 * g_.ci * c0, 0};
  }

 private:
  Geometry g_;
  const T* kernel_;
  int64_t width_ = 8 * Vec<T>::kLanes;
  bool copied_ = false;
};

template <bool kValued, typename T>
void SpikeConv(ffi::ThreadPool& pool, const Geometry& g, const T* x, const T* kernel, T* out) {
  const Active<T> a = BuildLists<kValued>(pool, g, x);
  // Tile-major task order: a task adds rows of one tile's kernel slice, which stays in L2.
  const int64_t positions = g.n * g.h * g.w, block = 64;
  const int64_t blocks = (positions + block - 1) / block;
  const Tiles<T> tiles(pool, g, kernel);
  const int64_t tile = tiles.width();
  ParallelFor(pool, tiles.count() * blocks, [&](int64_t i) {
    const int64_t c0 = (i / blocks) * tile, c1 = std::min(g.co, c0 + tile);
    const TileView<T> v = tiles.View(c0, c1);
    for (int64_t p = (i % blocks) * block, end = std::min(positions, p + block); p < end; ++p)
      Accumulate<kValued>(v.g, v.kernel, a, p / (g.h * g.w), (p / g.w) % g.h, p % g.w, v.c0,
                 v.c0 + c1 - c0, out + p * g.co + c0);
  });
}

// Whether all 64 bytes of v are zero (a -0.0 counts as nonzero: adding it changes nothing).
template <typename VT>
inline bool AllZero(VT v) {
#if defined(__AVX512F__)
  __m512i bits;
  std::memcpy(&bits, &v, sizeof bits);
  return _mm512_test_epi64_mask(bits, bits) == 0;
#else
  uint64_t words[8], any = 0;
  std::memcpy(words, &v, sizeof words);
  for (uint64_t word : words) any |= word;
  return any == 0;
#endif
}

// The kernel gradient of the 3x3 'SAME' convolution of 0/1 spikes x (N, H, W, Ci), given the
// cotangent g (N, H, W, Co) of its output:
//   dw[dy, dx, c, :] = sum over output positions p with x[p + (dy - 1, dx - 1), c] != 0 of g[p, :]
// Only active inputs are visited, and rows of g that are zero in a tile (most of them under the
// ste clip window and the max pool's routing) are skipped. A task takes one tile of output
// channels (narrowed like the forward's, so that its 9 * ci rows fit in L2) and one of `splits`
// contiguous ranges of input positions q, which it goes through in chunks of kGradChunk: it lists
// each q's active channels, then, tap by tap, loads for each q the row g[p, tile] of the output
// position p that q feeds through that tap and adds it to the task's rows dw[tap, c, tile], kept
// tile-major (contiguous) in a partial sum of its own. Tap by tap, one tap's rows (ci * tile
// values) are the ones being updated, in L1 for the smaller layers, where all nine taps' are in
// L2; each dw value still adds its q in ascending order. The partial sums are then added in
// split order: the result does not depend on the thread count.
constexpr int64_t kGradChunk = 64;
template <typename T, int K>
void KernelGradTile(const Geometry& g, const bool* x, const T* grad, int64_t q0, int64_t q1,
                    int64_t c0, int64_t width, T* dw) {
  using V = Vec<T>;
  using VT = typename V::type;
  constexpr int64_t L = V::kLanes;
  thread_local std::vector<uint16_t> list_buf, count_buf;
  uint16_t* lists = Aligned(list_buf, kGradChunk * g.ci + 16);
  uint16_t* counts = Aligned(count_buf, kGradChunk);
  for (int64_t qa = q0; qa < q1; qa += kGradChunk) {
    const int64_t qb = std::min(q1, qa + kGradChunk);
    bool any = false;
    for (int64_t q = qa; q < qb; ++q) {
      counts[q - qa] = ActiveChannels(x + q * g.ci, g.ci, lists + (q - qa) * g.ci,
                                      static_cast<T*>(nullptr));
      any |= counts[q - qa] != 0;
    }
    if (!any) continue;
    for (int64_t dy = 0; dy < 3; ++dy) {
      for (int64_t dx = 0; dx < 3; ++dx) {
        T* tap = dw + (dy * 3 + dx) * g.ci * width;
        for (int64_t q = qa; q < qb; ++q) {
          const int64_t m = counts[q - qa];
          if (m == 0) continue;
          const int64_t b = q / (g.h * g.w), yy = (q / g.w) % g.h, xx = q % g.w;
          const int64_t y = yy - dy + 1, xpos = xx - dx + 1;
          if (y < 0 || y >= g.h || xpos < 0 || xpos >= g.w) continue;
          const T* row = grad + ((b * g.h + y) * g.w + xpos) * g.co + c0;
          const uint16_t* list = lists + (q - qa) * g.ci;
          if constexpr (K > 0) {
            VT v[K], nonzero{};
            for (int k = 0; k < K; ++k) {
              v[k] = V::Load(row + k * L);
              nonzero = nonzero != VT{} ? nonzero : v[k];  // a nonzero lane of any row stays
            }
            if (AllZero(nonzero)) continue;
            for (int64_t j = 0; j < m; ++j) {
              T* out = tap + list[j] * width;
#pragma GCC unroll 8
              for (int k = 0; k < K; ++k) V::Store(out + k * L, V::Load(out + k * L) + v[k]);
            }
          } else {
            for (int64_t j = 0; j < m; ++j) {
              T* out = tap + list[j] * width;
              for (int64_t c = 0; c < width; ++c) out[c] += row[c];
            }
          }
        }
      }
    }
  }
}

// The kernel gradient's tiles of dw, which every active input's rows are added into, stay at
// 640 KB whatever the L2 (1.25 MB was slower on a 2 MB L2: 67 -> 74 ms, layer 4).
constexpr int64_t kKernelGradTileBytes = 640 << 10;

template <typename T>
void SpikeKernelGrad(ffi::ThreadPool& pool, const Geometry& g, const bool* x, const T* grad,
                     T* out) {
  constexpr int64_t L = Vec<T>::kLanes;
  int64_t width = 8 * L;
  while (width > L && 9 * g.ci * width * int64_t(sizeof(T)) > kKernelGradTileBytes) width /= 2;
  width = std::min(width, g.co);
  const int64_t tiles = (g.co + width - 1) / width, positions = g.n * g.h * g.w;
  // At least 16 tasks (2 cores: a task is at most 1/16 of the work left over), fixed by the
  // geometry alone so that the sums' order is too.
  const int64_t splits = std::max<int64_t>(1, std::min(positions, (16 + tiles - 1) / tiles));
  const int64_t size = 9 * g.ci * g.co;  // one split's partial sum, tile-major
  thread_local std::vector<T> partial_buf;
  T* partial = Aligned(partial_buf, splits * size);
  std::fill(partial, partial + splits * size, T(0));
  ParallelFor(pool, tiles * splits, [&](int64_t i) {
    const int64_t t = i / splits, s = i % splits;
    const int64_t c0 = t * width, w = std::min(g.co, c0 + width) - c0;
    const int64_t q0 = positions * s / splits, q1 = positions * (s + 1) / splits;
    T* dw = partial + s * size + 9 * g.ci * c0;
    if (w == 8 * L) KernelGradTile<T, 8>(g, x, grad, q0, q1, c0, w, dw);
    else if (w == 4 * L) KernelGradTile<T, 4>(g, x, grad, q0, q1, c0, w, dw);
    else if (w == 2 * L) KernelGradTile<T, 2>(g, x, grad, q0, q1, c0, w, dw);
    else if (w == L) KernelGradTile<T, 1>(g, x, grad, q0, q1, c0, w, dw);
    else KernelGradTile<T, 0>(g, x, grad, q0, q1, c0, w, dw);
  });
  // out (HWIO) = the sum of the splits' partials, in split order; a task per row (tap, c).
  ParallelFor(pool, 9 * g.ci, [&](int64_t row) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t c0 = t * width, w = std::min(g.co, c0 + width) - c0;
      T* dst = out + row * g.co + c0;
      const T* src = partial + 9 * g.ci * c0 + row * w;
      std::memcpy(dst, src, w * sizeof(T));
      for (int64_t s = 1; s < splits; ++s)
        for (int64_t c = 0; c < w; ++c) dst[c] += src[s * size + c];
    }
  });
}

// `steps` time steps of a spiking layer (docs/ORIGINAL.md), fused: at every step, pred = the
// synapse on that step's input spikes plus the bias (or, without a kernel, the constant pred x: the
// first layer; or, with step_preds, x's pred of that step), clipped to [0, 1], integrated into the
// membrane, fire at 1, reset by subtraction; then the 2x2 max pool of the spikes (if `pool`) and
// the number of spikes per image (before pooling). Only the first `valid` steps run (0 <= valid <=
// steps, a runtime operand, so one compiled call serves a padded last chunk): a later step leaves
// the membranes unchanged and emits no spike (its output is zeros). The steps go in blocks of
// kStepBlock (the active-channel lists are built for one block at a time, which bounds the scratch
// memory). A task takes one tile of channels of two rows of one image and keeps their membranes in
// L1 across a block's steps, so the membranes are read and written once per block. It owns whole
// pooling windows; the tile is the slowest task index, so consecutive tasks share a tile's kernel
// slice in the cache.
// Three choices keep the kernel rows in cache (the row additions are bound by their loads):
//   - per position, the synapse of all the block's steps, tap-major (AccumulateSteps): the rows a
//     tap adds at one step are in L1 for the next steps (the same channels keep firing);
//   - the tile is narrowed (128 -> 64 -> ... floats) until its slice fits in TileBytes() of L2,
//     and a narrowed tile's slice is read from a tile-major copy of the kernel (Tiles).
// None of them changes any sum's order: the result is bitwise that of `Accumulate` per step.
//   x: (steps, n, h, w, ci) spikes, or without a kernel (n, h, w, co) pred, or (steps, n, h, w,
//      co) preds with step_preds
//   state, state_out: (n, h, w, co) (may alias)   spikes_out: (steps, n, h', w', co)
//   counts_out: (n,)   valid: the number of steps that run
constexpr int64_t kStepBlock = 8;
template <typename T>
void SpikeLayer(ffi::ThreadPool& pool, const Geometry& g, int64_t steps, int64_t valid,
                bool do_pool, bool step_preds, const T* x, const T* kernel, const T* bias,
                const T* state, T* spikes_out, T* state_out, T* counts_out) {
  using V = Vec<T>;
  using VT = typename V::type;
  constexpr int64_t L = V::kLanes, kTile = 8 * L;
  const Tiles<T> kernel_tiles(pool, g, kernel);  // without a kernel: tiles of kTile, no copy
  const int64_t tile = kernel != nullptr ? kernel_tiles.width() : kTile;
  const int64_t tiles = (g.co + tile - 1) / tile;
  const int64_t pairs = (g.h + 1) / 2;  // row pairs per image (the last may be a single row)
  const int64_t oh = do_pool ? g.h / 2 : g.h, ow = do_pool ? g.w / 2 : g.w;
  std::vector<T> partial(tiles * g.n * pairs, T(0));  // spikes per task, summed in order below
  valid = std::clamp<int64_t>(valid, 0, steps);
  const int64_t out_step = g.n * oh * ow * g.co;  // elements of one step's output spikes
  std::memset(spikes_out + valid * out_step, 0, (steps - valid) * out_step * sizeof(T));
  if (valid == 0 && state_out != state)
    std::memcpy(state_out, state, g.n * g.h * g.w * g.co * sizeof(T));
  for (int64_t k0 = 0; k0 < valid; k0 += kStepBlock) {
    const int64_t k1 = std::min(valid, k0 + kStepBlock);
    Active<T> a{};
    if (kernel != nullptr) {  // the block's images: image (k - k0) * n + b
      Geometry block = g;
      block.n = (k1 - k0) * g.n;
      a = BuildLists<false>(pool, block, x + k0 * g.n * g.h * g.w * g.ci);
    }
    const T* membranes = k0 == 0 ? state : state_out;
    ParallelFor(pool, tiles * g.n * pairs, [&](int64_t i) {
      const int64_t t = i / (g.n * pairs), b = (i / pairs) % g.n, r = i % pairs;
      const int64_t c0 = t * tile, c1 = std::min(g.co, c0 + tile), width = c1 - c0;
      const TileView<T> v = kernel_tiles.View(c0, c1);
      const VT zero{}, one = zero + T(1);
      VT fired_lanes{};  // spike counts, exact in any order (integers)
      T total = 0;
      alignas(64) T membrane[kTile], zs[kStepBlock * kTile];  // zs: a pred per step of the block
      auto out_row = [&](int64_t k, int64_t y, int64_t xpos) {
        return spikes_out + (((k * g.n + b) * oh + y) * ow + xpos) * g.co + c0;
      };
      if (do_pool)  // the windows are max-accumulated below
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t ox = 0; ox < ow; ++ox)
            std::memset(out_row(k, r, ox), 0, width * sizeof(T));
      for (int64_t y = 2 * r; y < std::min(2 * r + 2, g.h); ++y) {
        for (int64_t xpos = 0; xpos < g.w; ++xpos) {
          const int64_t p = (b * g.h + y) * g.w + xpos;
          std::memcpy(membrane, membranes + p * g.co + c0, width * sizeof(T));
          if (kernel != nullptr)
            AccumulateSteps(v.g, v.kernel, a, b, y, xpos, v.c0, v.c0 + width,
                            k1 - k0, zs, kTile);
          else if (step_preds)  // step k's pred
            for (int64_t k = k0; k < k1; ++k)
              std::memcpy(zs + (k - k0) * kTile, x + (k * g.n * g.h * g.w + p) * g.co + c0,
                          width * sizeof(T));
          else  // the constant pred of every step
            std::memcpy(zs, x + p * g.co + c0, width * sizeof(T));
          for (int64_t k = k0; k < k1; ++k) {
            T* z = kernel != nullptr || step_preds ? zs + (k - k0) * kTile : zs;
            if (kernel != nullptr)
              for (int64_t c = 0; c < width; ++c) z[c] += bias[c0 + c];
            T* o = do_pool ? out_row(k, y / 2, xpos / 2) : out_row(k, y, xpos);
            int64_t c = 0;
            for (; c + L <= width; c += L) {  // the scalar loop below, a vector at a time
              VT pred = V::Load(z + c);
              pred = pred < zero ? zero : pred;
              pred = one < pred ? one : pred;
              VT v = V::Load(membrane + c) + pred;
              VT fire = v >= one ? one : zero;
              V::Store(membrane + c, v - fire);
              fired_lanes += fire;
              if (do_pool) fire = V::Load(o + c) < fire ? fire : V::Load(o + c);
              V::Store(o + c, fire);
            }
            for (; c < width; ++c) {
              T pred = std::min(std::max(z[c], T(0)), T(1));
              T v = membrane[c] + pred;
              T fire = v >= T(1) ? T(1) : T(0);
              membrane[c] = v - fire;
              total += fire;
              o[c] = do_pool ? std::max(o[c], fire) : fire;
            }
          }
          std::memcpy(state_out + p * g.co + c0, membrane, width * sizeof(T));
        }
      }
      for (int64_t l = 0; l < L; ++l) total += fired_lanes[l];
      partial[i] += total;
    });
  }
  for (int64_t b = 0; b < g.n; ++b) {
    T sum = 0;
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t r = 0; r < pairs; ++r) sum += partial[(t * g.n + b) * pairs + r];
    counts_out[b] = sum;
  }
}

template <ffi::DataType D, bool kValued>
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
  SpikeConv<kValued>(pool, g, x.typed_data(), kernel.typed_data(), out->typed_data());
  return ffi::Error::Success();
}

template <ffi::DataType D>
ffi::Error SpikeKernelGradHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::PRED> x,
                                  ffi::Buffer<D> grad, ffi::ResultBuffer<D> out) {
  auto xd = x.dimensions(), gd = grad.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || od.size() != 4 || gd[0] != xd[0] ||
      gd[1] != xd[1] || gd[2] != xd[2] || od[0] != 3 || od[1] != 3 || od[2] != xd[3] ||
      od[3] != gd[3])
    return ffi::Error::InvalidArgument("spike_kernel_grad: expected (N, H, W, Ci) bool spikes, "
                                       "an (N, H, W, Co) cotangent and a (3, 3, Ci, Co) result");
  if (xd[3] > 65535)
    return ffi::Error::InvalidArgument("spike_kernel_grad: at most 65535 input channels");
  Geometry g{xd[0], xd[1], xd[2], xd[3], gd[3]};
  SpikeKernelGrad(pool, g, x.typed_data(), grad.typed_data(), out->typed_data());
  return ffi::Error::Success();
}

template <ffi::DataType D>
ffi::Error SpikeLayerHandler(ffi::ThreadPool pool, ffi::Buffer<D> x, ffi::Buffer<D> kernel,
                             ffi::Buffer<D> bias, ffi::Buffer<D> state,
                             ffi::Buffer<ffi::S32> valid, bool do_pool,
                             ffi::ResultBuffer<D> spikes, ffi::ResultBuffer<D> state_out,
                             ffi::ResultBuffer<D> counts) {
  auto xd = x.dimensions(), kd = kernel.dimensions(), sd = state.dimensions();
  if (xd.size() != 5 || kd.size() != 4 || sd.size() != 4 || bias.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("spike_layer: expected (T, N, H, W, Ci) spikes, a (3, 3, "
                                       "Ci, Co) kernel, a (Co,) bias and an (N, H, W, Co) state");
  Geometry g{xd[1], xd[2], xd[3], xd[4], kd[3]};
  if (kd[0] != 3 || kd[1] != 3 || kd[2] != g.ci || bias.dimensions()[0] != g.co ||
      sd[0] != g.n || sd[1] != g.h || sd[2] != g.w || sd[3] != g.co)
    return ffi::Error::InvalidArgument("spike_layer: shapes do not match");
  if (g.ci > 65535 || (do_pool && (g.h % 2 || g.w % 2)))
    return ffi::Error::InvalidArgument("spike_layer: at most 65535 input channels; pooling "
                                       "needs an even height and width");
  if (valid.dimensions().size() != 0)
    return ffi::Error::InvalidArgument("spike_layer: valid must be an int32 scalar");
  SpikeLayer(pool, g, xd[0], *valid.typed_data(), do_pool, false, x.typed_data(),
             kernel.typed_data(), bias.typed_data(), state.typed_data(), spikes->typed_data(),
             state_out->typed_data(), counts->typed_data());
  return ffi::Error::Success();
}

// The neuron alone for `steps` steps of a constant pred (the first layer: its input is the image).
template <ffi::DataType D>
ffi::Error SpikeNeuronHandler(ffi::ThreadPool pool, ffi::Buffer<D> pred, ffi::Buffer<D> state,
                              ffi::Buffer<ffi::S32> valid, bool do_pool, int64_t steps,
                              ffi::ResultBuffer<D> spikes,
                              ffi::ResultBuffer<D> state_out, ffi::ResultBuffer<D> counts) {
  auto pd = pred.dimensions(), sd = state.dimensions();
  if (pd.size() != 4 || sd.size() != 4 || pd[0] != sd[0] || pd[1] != sd[1] || pd[2] != sd[2] ||
      pd[3] != sd[3] || steps < 1 || valid.dimensions().size() != 0)
    return ffi::Error::InvalidArgument("spike_neuron: expected (N, H, W, C) pred and state, an "
                                       "int32 scalar valid, and steps >= 1");
  Geometry g{pd[0], pd[1], pd[2], pd[3], pd[3]};
  if (do_pool && (g.h % 2 || g.w % 2))
    return ffi::Error::InvalidArgument("spike_neuron: pooling needs an even height and width");
  SpikeLayer<ffi::NativeType<D>>(pool, g, steps, *valid.typed_data(), do_pool, false,
                                 pred.typed_data(), nullptr, nullptr,
                                 state.typed_data(), spikes->typed_data(),
                                 state_out->typed_data(), counts->typed_data());
  return ffi::Error::Success();
}

// The neuron alone for the steps of a pred per step (T, N, H, W, C): a layer whose synapse ran
// elsewhere (the training forward, whose synapse is `conv` over all steps at once).
template <ffi::DataType D>
ffi::Error SpikeNeuronStepsHandler(ffi::ThreadPool pool, ffi::Buffer<D> preds,
                                   ffi::Buffer<D> state, ffi::Buffer<ffi::S32> valid, bool do_pool,
                                   ffi::ResultBuffer<D> spikes, ffi::ResultBuffer<D> state_out,
                                   ffi::ResultBuffer<D> counts) {
  auto pd = preds.dimensions(), sd = state.dimensions();
  if (pd.size() != 5 || sd.size() != 4 || pd[1] != sd[0] || pd[2] != sd[1] || pd[3] != sd[2] ||
      pd[4] != sd[3] || valid.dimensions().size() != 0)
    return ffi::Error::InvalidArgument("spike_neuron_steps: expected (T, N, H, W, C) preds, an "
                                       "(N, H, W, C) state and an int32 scalar valid");
  Geometry g{pd[1], pd[2], pd[3], pd[4], pd[4]};
  if (do_pool && (g.h % 2 || g.w % 2))
    return ffi::Error::InvalidArgument("spike_neuron_steps: pooling needs an even height and "
                                       "width");
  SpikeLayer<ffi::NativeType<D>>(pool, g, pd[0], *valid.typed_data(), do_pool, true,
                                 preds.typed_data(), nullptr, nullptr, state.typed_data(),
                                 spikes->typed_data(), state_out->typed_data(),
                                 counts->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// The bindings: what each handler receives (its context, operands and attributes) and returns.
// Every layer op returns (spikes, state, counts) of the layer's dtype.
template <ffi::DataType D, typename Binding>
auto WithLayerResults(Binding&& binding) {
  return std::move(binding)
      .template Ret<ffi::Buffer<D>>()
      .template Ret<ffi::Buffer<D>>()
      .template Ret<ffi::Buffer<D>>();
}

template <ffi::DataType D>
auto NeuronBinding() {  // pred, state, valid; pool, steps
  return WithLayerResults<D>(ffi::Ffi::Bind()
                                 .template Ctx<ffi::ThreadPool>()
                                 .template Arg<ffi::Buffer<D>>()
                                 .template Arg<ffi::Buffer<D>>()
                                 .template Arg<ffi::Buffer<ffi::S32>>()
                                 .template Attr<bool>("pool")
                                 .template Attr<int64_t>("steps"));
}

template <ffi::DataType D>
auto NeuronStepsBinding() {  // preds, state, valid; pool
  return WithLayerResults<D>(ffi::Ffi::Bind()
                                 .template Ctx<ffi::ThreadPool>()
                                 .template Arg<ffi::Buffer<D>>()
                                 .template Arg<ffi::Buffer<D>>()
                                 .template Arg<ffi::Buffer<ffi::S32>>()
                                 .template Attr<bool>("pool"));
}

template <ffi::DataType D>
auto LayerBinding() {  // spikes, kernel, bias, state, valid; pool
  return WithLayerResults<D>(ffi::Ffi::Bind()
                                 .template Ctx<ffi::ThreadPool>()
                                 .template Arg<ffi::Buffer<D>>()
                                 .template Arg<ffi::Buffer<D>>()
                                 .template Arg<ffi::Buffer<D>>()
                                 .template Arg<ffi::Buffer<D>>()
                                 .template Arg<ffi::Buffer<ffi::S32>>()
                                 .template Attr<bool>("pool"));
}

template <ffi::DataType In, ffi::DataType D>
auto ConvBinding() {  // x (In), kernel or cotangent (D) -> D
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<In>>()
      .template Arg<ffi::Buffer<D>>()
      .template Ret<ffi::Buffer<D>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeNeuronF32, SpikeNeuronHandler<ffi::F32>,
                              NeuronBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeNeuronF64, SpikeNeuronHandler<ffi::F64>,
                              NeuronBinding<ffi::F64>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeNeuronStepsF32, SpikeNeuronStepsHandler<ffi::F32>,
                              NeuronStepsBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeNeuronStepsF64, SpikeNeuronStepsHandler<ffi::F64>,
                              NeuronStepsBinding<ffi::F64>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeLayerF32, SpikeLayerHandler<ffi::F32>,
                              LayerBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeLayerF64, SpikeLayerHandler<ffi::F64>,
                              LayerBinding<ffi::F64>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeConvF32, (SpikeConvHandler<ffi::F32, false>),
                              (ConvBinding<ffi::F32, ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeConvF64, (SpikeConvHandler<ffi::F64, false>),
                              (ConvBinding<ffi::F64, ffi::F64>()));
// The same convolution of any input, each nonzero entry's row times its value: the input
// gradient of a convolution, from its output's cotangent (mostly zeros) and the flipped kernel.
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSparseConvF32, (SpikeConvHandler<ffi::F32, true>),
                              (ConvBinding<ffi::F32, ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSparseConvF64, (SpikeConvHandler<ffi::F64, true>),
                              (ConvBinding<ffi::F64, ffi::F64>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeKernelGradF32, SpikeKernelGradHandler<ffi::F32>,
                              (ConvBinding<ffi::PRED, ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BitnetSpikeKernelGradF64, SpikeKernelGradHandler<ffi::F64>,
                              (ConvBinding<ffi::PRED, ffi::F64>()));
