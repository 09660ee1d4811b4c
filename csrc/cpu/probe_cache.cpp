// The gemm-backend probe's verdict on disk (probe_cache.h).

#include "probe_cache.h"

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>

namespace rnnkern::cpu {
namespace {

// /proc/cpuinfo's identity lines for the first CPU, in a fixed order ("" elsewhere).
std::string cpu_identity() {
  static const char* const kKeys[] = {"vendor_id", "cpu family", "model", "model name",
                                      "stepping"};
  std::string found[std::size(kKeys)];
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line) && !line.empty()) {  // the first processor's block only
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    auto name = line.substr(0, colon);
    name.erase(name.find_last_not_of(" \t") + 1);
    for (size_t i = 0; i < std::size(kKeys); ++i)
      if (name == kKeys[i] && found[i].empty()) found[i] = line.substr(colon + 1) + ";";
  }
  std::string id;
  for (const auto& v : found) id += v;
  return id;
}

// This extension's file, size and modification time: a rebuild probes anew.
std::string build_identity() {
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&probe_cache_path), &info) || !info.dli_fname) return "";
  struct stat st;
  if (stat(info.dli_fname, &st) != 0) return info.dli_fname;
  std::ostringstream s;
  s << info.dli_fname << ";" << st.st_size << ";" << st.st_mtim.tv_sec << "." << st.st_mtim.tv_nsec;
  return s.str();
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string cache_dir() {
  if (const char* d = std::getenv("RNNKERN_CACHE_DIR")) return d;  // "" turns the cache off
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/rnnkern";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/rnnkern";
  return "";
}

}  // namespace

std::string probe_cache_path(const char* capability) {
  const std::string dir = cache_dir();
  if (dir.empty()) return "";
  std::ostringstream key;
  key << cpu_identity() << "|" << build_identity() << "|" << capability;
  char name[64];
  std::snprintf(name, sizeof(name), "gemm-backend-%016llx.txt",
                static_cast<unsigned long long>(fnv1a(key.str())));
  return dir + "/" + name;
}

std::optional<ProbeVerdict> read_probe_cache(const std::string& path) {
  std::ifstream f(path);
  ProbeVerdict v;
  for (int k = 0; k < kGemmKinds; ++k) {
    std::string kind, who;
    auto& d = v.kind[k];
    if (!(f >> kind >> who >> d.tiles_s >> d.blas_s) || kind != kGemmKindNames[k] ||
        (who != "rnnkern" && who != "blas")) {
      return std::nullopt;
    }
    d.tiles = who == "rnnkern";
  }
  return v;
}

std::optional<ProbeVerdict> store_probe_cache(const std::string& path, const ProbeVerdict& v) {
  std::error_code ec;
  const std::filesystem::path p(path);
  std::filesystem::create_directories(p.parent_path(), ec);
  const std::string tmp = path + ".tmp." + std::to_string(getpid());
  {
    std::ofstream f(tmp);
    f.precision(9);
    for (int k = 0; k < kGemmKinds; ++k) {
      const auto& d = v.kind[k];
      f << kGemmKindNames[k] << (d.tiles ? " rnnkern " : " blas ") << d.tiles_s << " "
        << d.blas_s << "\n";
    }
    f << "# rnnkern's gemm-backend probe: per kind of product (x w and a^T b with a panel of "
         "at most "
      << kSmallPanel
      << " elements, and larger ones), the verdict, tiles seconds and BLAS seconds. Delete this "
         "file to probe again; RNNKERN_GEMM=blas|rnnkern overrides it.\n";
    if (!f) {
      std::remove(tmp.c_str());
      return std::nullopt;
    }
  }
  // link() fails where the file exists: the first writer's verdict stands.
  if (::link(tmp.c_str(), path.c_str()) == 0) {
    std::remove(tmp.c_str());
    return v;
  }
  const int err = errno;
  if (err == EEXIST) {
    if (auto held = read_probe_cache(path)) {
      std::remove(tmp.c_str());
      return held;
    }
    std::filesystem::rename(tmp, p, ec);  // it did not parse: replace it
    if (!ec) return v;
  }
  std::remove(tmp.c_str());
  return std::nullopt;
}

}  // namespace rnnkern::cpu
