// Which closed-form map of a Gaussian (docs/math.md section 2) a kernel applies. The values are the map
// ids of the Triton kernels (gsa_kernels/gaussian/triton_gaussian.py: 0 is project there), so C++ and
// Python name the maps with the same numbers.
#pragma once

namespace gsa {

enum class MapKind : int { Denoise = 1, Score = 2, Teleport = 3 };

}  // namespace gsa
