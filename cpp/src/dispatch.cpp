// Picks the instruction set: cpuid + xgetbv (the OS must save the wide registers), once per process for the
// capability, once per call for the choice (a forced ISA from $KERNELATLAS_ISA or set_isa() wins) -- and holds
// the registry of compiled variants (isa_registry.h) that every kernel driver takes its tables from.
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "isa_registry.h"
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
bool detect_bf16() {
  unsigned int a, b, c, d;
  if (detect() != Isa::avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return a & (1u << 5);  // AVX512_BF16 (CPUID.(EAX=7,ECX=1):EAX[5])
}
#else
Isa detect() { return Isa::scalar; }
bool detect_bf16() { return false; }
#endif

// The compiled variants, lowest ISA first; scalar is always built (CMakeLists.txt, ka_isa_variant).
const IsaVariant* const kVariants[] = {
    &isa_scalar::variant(),
#if KA_VARIANT_AVX2
    &isa_avx2::variant(),
#endif
#if KA_VARIANT_AVX512
    &isa_avx512::variant(),
#endif
};

const IsaVariant* find_variant(Isa isa) {
  for (const IsaVariant* v : kVariants)
    if (v->isa == isa) return v;
  return nullptr;
}

constexpr int kAuto = -1;
std::atomic<int> g_forced{kAuto};
std::once_flag g_env_once;

Isa parse(const std::string& name) {
  if (name == "scalar") return Isa::scalar;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  throw std::invalid_argument("unknown ISA '" + name + "': use scalar, avx2 or avx512 (or unset KERNELATLAS_ISA)");
}

// Compiled into this build and within what the CPU runs.
bool runnable(Isa isa) {
  return find_variant(isa) != nullptr && static_cast<int>(isa) <= static_cast<int>(best_supported_isa());
}

void init_from_env() {
  std::call_once(g_env_once, [] {
    const char* env = std::getenv("KERNELATLAS_ISA");
    if (env && *env && std::string(env) != "auto") {
      const Isa want = parse(env);
      if (!runnable(want))
        throw std::invalid_argument(std::string("KERNELATLAS_ISA=") + env + " but this CPU supports at most " +
                                    isa_name(best_supported_isa()) + ": unset it or choose a lower level");
      g_forced = static_cast<int>(want);
    }
  });
}

}  // namespace

Isa best_supported_isa() {
  static const Isa best = [] {
    const Isa cpu = detect();
    Isa out = Isa::scalar;
    for (const IsaVariant* v : kVariants)
      if (static_cast<int>(v->isa) <= static_cast<int>(cpu)) out = v->isa;
    return out;
  }();
  return best;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (const IsaVariant* v : kVariants) out.push_back(isa_name(v->isa));
  return out;
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
  for (const IsaVariant* v : kVariants)
    if (static_cast<int>(v->isa) <= static_cast<int>(best_supported_isa())) out.push_back(isa_name(v->isa));
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
  if (!runnable(want)) {
    std::string supported;
    for (const std::string& s : supported_isas()) supported += (supported.empty() ? "" : ", ") + s;
    throw std::invalid_argument("this CPU cannot run the " + name + " path; supported: " + supported);
  }
  g_forced = static_cast<int>(want);
  return previous;
}

Isa active_isa() {
  init_from_env();
  const int f = g_forced.load();
  return f == kAuto ? best_supported_isa() : static_cast<Isa>(f);
}

bool bf16_available(std::string* why) {
  static const bool cpu = detect_bf16();
  const bool compiled = find_variant(Isa::avx512) != nullptr;
  const Isa isa = active_isa();
  if (compiled && cpu && isa == Isa::avx512) return true;
  if (why != nullptr) {
    if (!compiled)
      *why = "this build has no AVX-512 engine variant";
    else if (!cpu)
      *why =
          "this CPU has no AVX512_BF16 instructions (e.g. AMD Zen 4 and later, Intel Cooper Lake and Sapphire "
          "Rapids and later have them)";
    else
      *why = "the engine runs its " + isa_name(isa) + " path (KERNELATLAS_ISA / set_isa); bf16 runs on avx512 only";
  }
  return false;
}

const IsaVariant& active_variant() {
  const IsaVariant* v = find_variant(active_isa());
  return v ? *v : *kVariants[0];  // set_isa() admits only compiled variants: not reached
}

}  // namespace kernelatlas
