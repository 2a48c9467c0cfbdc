// Exact top-k of float32 rows for XLA:CPU, as an XLA FFI custom call (dsv3_jax.ops.top_k, "cpu_kernel" variant).
//
// The same result as jax.lax.top_k: per row the k largest values in descending order, equal values by
// ascending index, ranked in the float total order XLA's TopK uses (-NaN < -inf < ... < -0 < +0 < ... <
// +inf < +NaN). XLA:CPU's own TopK partial-sorts an index array per row through an indirect comparator, one
// row after another; DSA's indexer asks it for 256 of up to 32K keys for every query (docs/PERFORMANCE.md).
// Here the k-th largest of a row's block maxima bounds its k-th best key from below, so only the blocks above
// that bound are scanned (`TopKRow`). Rows go to XLA's intra-op threads in chunks, the calling thread taking
// chunks too (so a busy pool only makes it slower).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A float's bits as a signed integer in XLA's total order of floats: negative floats have their lower 31
// bits flipped, so that a more negative float is a smaller integer.
inline int32_t OrderKey(float v) {
  int32_t s;
  std::memcpy(&s, &v, sizeof(s));
  return s ^ ((s >> 31) & 0x7FFFFFFF);
}

// The key and the index in one word: a larger word ranks first (a larger value; equal values, a lower
// index). The key is biased to unsigned so that the word compares as the pair does.
inline uint64_t Rank(int32_t key, int64_t index) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(key) ^ 0x80000000u) << 32) |
         (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

inline int64_t IndexOf(uint64_t rank) { return 0xFFFFFFFFu - static_cast<uint32_t>(rank); }

// Scratch of one thread, kept across rows and calls (thread_local): it only grows, so a decode step's
// call allocates and touches nothing new.
struct Scratch {
  std::vector<int32_t> maxima, order;
  std::vector<uint64_t> cand;
};

template <typename T>
T* AtLeast(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// One row: the best k of x[0..n) into values[0..k), indices[0..k). 1 <= k <= n < 2^31.
//
// 1. The keys' maxima over blocks of b (about 4k blocks). At least k keys are >= the k-th largest block
//    maximum, tau, so every one of the best k is >= tau: a block whose maximum is below tau holds none.
// 2. The keys > tau of the other blocks are the candidates (for random scores ~k of them).
// 3. Fewer than k candidates: the rest are keys equal to tau, the lowest indices first (a query that sees
//    fewer than k keys: its -inf slots in index order, as XLA ranks them).
// 4. The best k candidates, sorted.
void TopKRow(const float* x, int64_t n, int64_t k, float* values, int32_t* indices, Scratch& s) {
  const int64_t b = std::min<int64_t>(64, std::max<int64_t>(1, n / (4 * k)));
  const int64_t blocks = (n + b - 1) / b;
  int32_t* maxima = AtLeast(s.maxima, blocks);
  for (int64_t j = 0; j < blocks; ++j) {
    int32_t most = INT32_MIN;
    for (int64_t i = j * b; i < std::min(n, (j + 1) * b); ++i) most = std::max(most, OrderKey(x[i]));
    maxima[j] = most;
  }
  int32_t tau = INT32_MIN;
  if (blocks >= k) {
    int32_t* order = AtLeast(s.order, blocks);
    std::copy(maxima, maxima + blocks, order);
    std::nth_element(order, order + (k - 1), order + blocks, std::greater<int32_t>());
    tau = order[k - 1];
  }
  // Fewer than k blocks have a maximum above tau (or, with fewer than k blocks, n < k b): at most k b keys
  // above it, then at most k equal to it.
  uint64_t* cand = AtLeast(s.cand, k * b + k + 1);
  int64_t size = 0;
  for (int64_t j = 0; j < blocks; ++j) {
    if (maxima[j] <= tau) continue;
    for (int64_t i = j * b; i < std::min(n, (j + 1) * b); ++i) {  // appends without a branch
      const int32_t key = OrderKey(x[i]);
      cand[size] = Rank(key, i);
      size += key > tau;
    }
  }
  for (int64_t i = 0; size < k && i < n; ++i) {
    const int32_t key = OrderKey(x[i]);
    if (key == tau) cand[size++] = Rank(key, i);
  }
  if (size > k) std::nth_element(cand, cand + (k - 1), cand + size, std::greater<uint64_t>());
  std::sort(cand, cand + k, std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = IndexOf(cand[j]);
    indices[j] = static_cast<int32_t>(i);
    values[j] = x[i];
  }
}

// What the calling thread and its helpers share; a helper that starts after the call has returned finds no
// chunk left and touches only this.
struct Chunks {
  std::atomic<int64_t> next{0};
  int64_t total = 0;
  int64_t done = 0;  // guarded by mu
  std::mutex mu;
  std::condition_variable all_done;
};

constexpr int64_t kMinKeysPerChunk = 1 << 16;  // below this a chunk is not worth a thread hand-off

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                    ffi::ResultBuffer<ffi::S32> indices) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("top_k: the input has no axis to rank along");
  const int64_t n = dims.back();
  const int64_t k = values->dimensions().back();
  if (k < 1 || k > n || n >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("top_k: k must be in [1, n] and n below 2^31");
  }
  const int64_t rows = static_cast<int64_t>(x.element_count()) / n;  // n >= 1, checked above
  const float* in = x.typed_data();
  float* out_values = values->typed_data();
  int32_t* out_indices = indices->typed_data();

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t rows_per_chunk =
      std::max<int64_t>(1, std::min((kMinKeysPerChunk + n - 1) / n, (rows + 4 * threads - 1) / (4 * threads)));
  auto chunks = std::make_shared<Chunks>();
  chunks->total = (rows + rows_per_chunk - 1) / rows_per_chunk;
  auto work = [=](Chunks& c) {
    thread_local Scratch scratch;
    int64_t finished = 0;
    for (int64_t i; (i = c.next.fetch_add(1)) < c.total; ++finished) {
      for (int64_t r = i * rows_per_chunk; r < std::min(rows, (i + 1) * rows_per_chunk); ++r) {
        TopKRow(in + r * n, n, k, out_values + r * k, out_indices + r * k, scratch);
      }
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(c.mu);
      c.done += finished;
      if (c.done == c.total) c.all_done.notify_all();
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks->total); ++t) {
    pool.Schedule([chunks, work] { work(*chunks); });
  }
  work(*chunks);
  std::unique_lock<std::mutex> lock(chunks->mu);
  chunks->all_done.wait(lock, [&] { return chunks->done == chunks->total; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3TopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
