"""The Gaussian map ids agree between Python (gsa_kernels/gaussian/map_kind.py: the Triton kernels and
their CUDA wrappers) and C++ (csrc/gaussian/map_kind.h)."""
import re

from gsa_kernels.gaussian import map_kind
from helpers import REPO_ROOT


def test_cpp_and_python_map_ids_agree():
    header = (REPO_ROOT / "csrc" / "gaussian" / "map_kind.h").read_text()
    enum = re.search(r"enum\s+class\s+\w+[^{]*\{([^}]*)\}", header)
    assert enum, "no enum class in csrc/gaussian/map_kind.h"
    cpp = {name.lower(): int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", enum.group(1))}
    assert cpp == {"denoise": map_kind.DENOISE, "score": map_kind.SCORE, "teleport": map_kind.TELEPORT}
    assert len({map_kind.PROJECT, map_kind.DENOISE, map_kind.SCORE, map_kind.TELEPORT}) == 4
