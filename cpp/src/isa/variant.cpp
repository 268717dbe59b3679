// One instruction-set variant of every CPU kernel.  CMake compiles this file once per ISA (ka_isa_variant in
// CMakeLists.txt) with that ISA's flags, KA_ISA = the level (0 scalar, 1 AVX2, 2 AVX-512; simd.h) and KA_NS =
// isa_<name>, a namespace of its own.  Everything else here is static inline or in KA_NS, and the kernels use
// no heap, no exceptions and no standard containers, so nothing compiled with one ISA's flags can be picked by
// the linker for another's path; the only symbol the registry (isa_registry.h) sees is KA_NS::variant().
#if !defined(KA_ISA) || !defined(KA_NS)
#error "isa/variant.cpp is compiled through ka_isa_variant() in CMakeLists.txt, which defines KA_ISA and KA_NS"
#endif

#include "isa/quality_impl.h"
#include "isa/tile_impl.h"
#include "isa_registry.h"

namespace kernelatlas {
namespace KA_NS {
namespace {

constexpr TileKernels kTile{
    T,
    &normalize_entry,
    &encode_entry,
    &decode_entry,
    &assign_entry,
    &assign_prototypes_entry,
    &fma_probe_entry,
    kProbeChains * W * 2,
};

constexpr QualityKernels kQuality{&piece_stats, &piece_rowmax, &sparse_moments, &coef_minmax,
                                  &coef_hist,   &count_labels, &orth_panel};

}  // namespace

const IsaVariant& variant() {
  static constexpr IsaVariant v{static_cast<Isa>(KA_ISA), &kTile, &kQuality};
  return v;
}

}  // namespace KA_NS
}  // namespace kernelatlas
