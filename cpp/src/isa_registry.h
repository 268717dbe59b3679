// The registry of instruction-set variants, the one place kernels are chosen by ISA.  CMake compiles
// isa/variant.cpp once per ISA with that ISA's flags and KA_ISA / KA_NS defined (ka_isa_variant in
// CMakeLists.txt); each copy exports one IsaVariant -- its tile kernels and its statistics kernels -- and
// dispatch.cpp lists the copies this build holds (KA_VARIANT_AVX2 / KA_VARIANT_AVX512).  Drivers take their
// table only from active_variant(), once per call, so set_isa() and $KERNELATLAS_ISA govern every kernel, and
// build_info()'s isa_compiled is read from the same list.
#pragma once
#include "kernelatlas/types.h"
#include "quality_kernels.h"
#include "tile_kernels.h"

namespace kernelatlas {

struct IsaVariant {
  Isa isa;
  const TileKernels* tile;
  const QualityKernels* quality;
};

// The variant of the active ISA: set_isa() / $KERNELATLAS_ISA, else the best compiled one this CPU runs.
const IsaVariant& active_variant();

// Exported by each compiled copy of isa/variant.cpp, in its own namespace (KA_NS).
namespace isa_scalar {
const IsaVariant& variant();
}
namespace isa_avx2 {
const IsaVariant& variant();
}
namespace isa_avx512 {
const IsaVariant& variant();
}

}  // namespace kernelatlas
