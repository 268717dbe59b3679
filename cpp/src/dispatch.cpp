// Picks the instruction set: cpuid + xgetbv (the OS must save the wide registers), once per process for the
// capability, once per call for the choice (a forced ISA from $KERNELATLAS_ISA or set_isa() wins).
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "kernelatlas/engine.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace kernelatlas {
namespace {

#if defined(__x86_64__) || defined(__i386__)
unsigned long long xgetbv0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

Isa detect() {
  unsigned int a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::scalar;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!(osxsave && avx)) return Isa::scalar;
  const unsigned long long xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6, os_avx512 = (xcr0 & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::scalar;
  const bool avx2 = b & (1u << 5);
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));  // F DQ BW VL
  if (os_avx512 && avx512 && avx2 && fma && f16c) return Isa::avx512;
  if (os_avx && avx2 && fma && f16c) return Isa::avx2;
  return Isa::scalar;
}
#else
Isa detect() { return Isa::scalar; }
#endif

constexpr int kAuto = -1;
std::atomic<int> g_forced{kAuto};
std::once_flag g_env_once;

Isa parse(const std::string& name) {
  if (name == "scalar") return Isa::scalar;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  throw std::invalid_argument("unknown ISA '" + name + "': use scalar, avx2 or avx512 (or unset KERNELATLAS_ISA)");
}

void init_from_env() {
  std::call_once(g_env_once, [] {
    const char* env = std::getenv("KERNELATLAS_ISA");
    if (env && *env && std::string(env) != "auto") {
      const Isa want = parse(env);
      if (static_cast<int>(want) > static_cast<int>(best_supported_isa()))
        throw std::invalid_argument(std::string("KERNELATLAS_ISA=") + env + " but this CPU supports at most " +
                                    isa_name(best_supported_isa()) + ": unset it or choose a lower level");
      g_forced = static_cast<int>(want);
    }
  });
}

}  // namespace

Isa best_supported_isa() {
  static const Isa best = detect();
  return best;
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "?";
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= static_cast<int>(best_supported_isa()); ++i) out.push_back(isa_name(static_cast<Isa>(i)));
  return out;
}

std::string forced_isa() {
  init_from_env();
  const int f = g_forced.load();
  return f == kAuto ? std::string() : isa_name(static_cast<Isa>(f));
}

std::string set_isa(const std::string& name) {
  std::string previous = forced_isa();
  if (name.empty() || name == "auto") {
    g_forced = kAuto;
    return previous;
  }
  const Isa want = parse(name);
  if (static_cast<int>(want) > static_cast<int>(best_supported_isa()))
    throw std::invalid_argument("this CPU cannot run the " + name + " path; supported: " + isa_name(Isa::scalar) +
                                (best_supported_isa() >= Isa::avx2 ? ", avx2" : "") +
                                (best_supported_isa() >= Isa::avx512 ? ", avx512" : ""));
  g_forced = static_cast<int>(want);
  return previous;
}

Isa active_isa() {
  init_from_env();
  const int f = g_forced.load();
  return f == kAuto ? best_supported_isa() : static_cast<Isa>(f);
}

}  // namespace kernelatlas
