#pragma once
// The gemm-backend probe's verdict, kept on disk per machine and build (not
// per thread count), so that every process on one machine makes the same
// choice, and so computes the same bits at any thread count, where the two
// backends run close enough for a per-process probe to flip between them. No
// torch headers: a small translation unit.

#include <array>
#include <cstdint>
#include <optional>
#include <string>

namespace rnnkern::cpu {

// The kinds of products the probe decides apart, by the size of the panel a
// product reuses across its rows: x [R,K] w [K,N] with K*N, a^T b with the
// M*N output, at most kSmallPanel elements ("xw", "atb": a panel that stays
// in L2, where the register tiles' fixed cost is small), or more ("large":
// the gated cells' projections at H = 512, a loss head over many classes,
// where BLAS's cache blocking counts).
enum GemmKind { kXw = 0, kAtb = 1, kLarge = 2, kGemmKinds = 3 };
inline constexpr const char* kGemmKindNames[kGemmKinds] = {"xw", "atb", "large"};
inline constexpr std::int64_t kSmallPanel = 65536;

struct KindVerdict {
  bool tiles = false;  // else BLAS
  double tiles_s = 0, blas_s = 0;  // the probe's fastest times (0 when not probed)
  bool operator==(const KindVerdict& o) const {
    return tiles == o.tiles && tiles_s == o.tiles_s && blas_s == o.blas_s;
  }
};

struct ProbeVerdict {
  std::array<KindVerdict, kGemmKinds> kind;
  bool operator==(const ProbeVerdict& o) const { return kind == o.kind; }
};

// The cache file for this CPU (/proc/cpuinfo's identity lines), this build of
// the extension (its file's path, size and modification time) and the
// kernels' capability: under $RNNKERN_CACHE_DIR, else
// $XDG_CACHE_HOME/rnnkern, else $HOME/.cache/rnnkern. "" when none of those is
// set, or RNNKERN_CACHE_DIR is set to the empty string (no cache).
std::string probe_cache_path(const char* capability);

// What the file holds, or nothing when it is missing or unreadable (a file
// that does not parse counts as missing and is replaced).
std::optional<ProbeVerdict> read_probe_cache(const std::string& path);

// Stores v unless another process stored a verdict first, and returns the one
// the file holds then: the first writer wins, so that processes probing at the
// same moment still agree. Nothing where the file cannot be written.
std::optional<ProbeVerdict> store_probe_cache(const std::string& path, const ProbeVerdict& v);

}  // namespace rnnkern::cpu
