#include "host_cache.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace rnnkern::cpu {
namespace {

constexpr std::size_t kHuge = std::size_t(2) << 20;  // the x86-64 huge page

std::int64_t limit_from_env() {
  const char* v = std::getenv("RNNKERN_HOST_CACHE_MB");
  if (v == nullptr || *v == '\0') return std::int64_t(1024) << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(v, &end, 10);
  const bool digits = v[0] >= '0' && v[0] <= '9' && *end == '\0';
  TORCH_CHECK_VALUE(errno == 0 && digits && mb < (1LL << 40),
                    "RNNKERN_HOST_CACHE_MB must be a whole number of MB >= 0, got '", v, "'");
  return std::int64_t(mb) << 20;
}

class HostCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(std::size_t n) override {
    const std::size_t size = (std::max<std::size_t>(n, 1) + kHuge - 1) / kHuge * kHuge;
    void* p = take(size);
    if (p == nullptr) {
      p = std::aligned_alloc(kHuge, size);
      if (p == nullptr) {  // the cache may hold what the OS lacks
        host_cache_empty();
        p = std::aligned_alloc(kHuge, size);
      }
      TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "rnnkern: could not allocate ", size,
                       " bytes on the CPU");
#ifdef MADV_HUGEPAGE
      madvise(p, size, MADV_HUGEPAGE);  // a hint: fewer faults where THP is 'madvise'
#endif
      std::lock_guard<std::mutex> lock(mu_);
      ++misses_;
      size_of_[p] = size;
      in_use_ += std::int64_t(size);
    }
    return {p, p, &HostCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &HostCache::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  HostCacheInfo info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_, in_use_, limit_, hits_, misses_};
  }

  void empty() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const Block& b : free_) {
        drop.push_back(b.p);
        size_of_.erase(b.p);
      }
      free_.clear();
      cached_ = 0;
    }
    for (void* p : drop) std::free(p);
  }

  static HostCache& instance() {
    // Never destroyed: a tensor may outlive static destruction at exit.
    static HostCache* cache = new HostCache();
    return *cache;
  }

 private:
  struct Block {
    void* p;
    std::size_t size;
  };

  HostCache() : limit_(limit_from_env()) {}

  // The smallest free block that fits without wasting more than a quarter of it.
  void* take(std::size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    std::size_t best = free_.size();
    for (std::size_t i = 0; i < free_.size(); ++i)
      if (free_[i].size >= size && free_[i].size - size <= free_[i].size / 4 &&
          (best == free_.size() || free_[i].size < free_[best].size))
        best = i;
    if (best == free_.size()) return nullptr;
    const Block b = free_[best];
    free_.erase(free_.begin() + std::ptrdiff_t(best));
    cached_ -= std::int64_t(b.size);
    in_use_ += std::int64_t(b.size);
    ++hits_;
    return b.p;
  }

  static void release(void* p) { instance().give_back(p); }

  // Keeps the block, then frees the oldest blocks while the cache is over its cap.
  void give_back(void* p) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = size_of_.find(p);
      TORCH_INTERNAL_ASSERT(it != size_of_.end(), "rnnkern: freeing a block it did not allocate");
      const std::size_t size = it->second;
      in_use_ -= std::int64_t(size);
      if (std::int64_t(size) > limit_) {  // never fits: free it, keep the others
        size_of_.erase(it);
        drop.push_back(p);
        return finish(drop);
      }
      free_.push_back({p, size});
      cached_ += std::int64_t(size);
      while (cached_ > limit_ && !free_.empty()) {
        drop.push_back(free_.front().p);
        cached_ -= std::int64_t(free_.front().size);
        size_of_.erase(free_.front().p);
        free_.erase(free_.begin());
      }
    }
    finish(drop);
  }

  static void finish(const std::vector<void*>& drop) {
    for (void* q : drop) std::free(q);
  }

  std::mutex mu_;
  std::vector<Block> free_;  // oldest first
  std::unordered_map<void*, std::size_t> size_of_;
  std::int64_t cached_ = 0, in_use_ = 0, limit_;
  std::int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

c10::Allocator* host_cache_allocator() { return &HostCache::instance(); }

HostCacheInfo host_cache_info() { return HostCache::instance().info(); }

void host_cache_empty() { HostCache::instance().empty(); }

at::Tensor big_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const auto dtype = c10::typeMetaToScalarType(opts.dtype());
  std::int64_t numel = 1;
  for (const auto d : sizes) numel *= d;
  if (opts.device().type() != c10::DeviceType::CPU ||
      numel * std::int64_t(c10::elementSize(dtype)) < kHostCacheMinBytes)
    return at::empty(sizes, opts);
  at::Tensor t = at::detail::empty_generic(sizes, host_cache_allocator(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                           c10::nullopt);
  // As at::empty: NaN under torch.use_deterministic_algorithms with
  // fill_uninitialized_memory, so tests/test_uninitialized.py sees a read of
  // a cached block's stale contents too.
  if (at::globalContext().deterministicAlgorithms() &&
      at::globalContext().deterministicFillUninitializedMemory())
    at::native::fill_empty_deterministic_(t);
  return t;
}

}  // namespace rnnkern::cpu
