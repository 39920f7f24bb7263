"""The package is self-contained: the sdist holds what a build needs and no development scaffolding, no file
points outside the repository, the license and citation files exist, and the extras match what the code
imports."""
import os
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SKIP_DIRS = {".git", ".venv", ".ci-venv", "build", "dist", "outputs", "runs", "__pycache__", ".pytest_cache"}


def _repo_files():
    """The repository's files: git's list in a checkout, else every file below the root (an sdist)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            files += [Path(dirpath) / f for f in filenames]
        return files


def test_sdist_holds_the_build_and_no_scaffolding(tmp_path):
    pytest.importorskip("scikit_build_core")
    proc = subprocess.run([sys.executable, "-c", "import sys; from scikit_build_core.build import build_sdist; "
                           "print(build_sdist(sys.argv[1]))", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist = tmp_path / proc.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        top = sdist.name[:-len(".tar.gz")]
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n and n.startswith(top)}
    needed = {"pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE", "CITATION.cff", "docs/math.md",
              "csrc/ops.cpp", "gsa_kernels/__init__.py", "gsa_kernels/_library.py", "gsa_kernels/triton_aot.py",
              "gsa_kernels/demo/__main__.py", "PKG-INFO"}
    assert needed <= names, sorted(needed - names)
    scaffolding = re.compile(r"^(\.ci/|dev$|notes/|requirements/|benchmarks/results/|\.git|\.venv|build/|dist/)"
                             r"|\.so$|__pycache__")
    assert not [n for n in names if scaffolding.search(n)], sorted(n for n in names if scaffolding.search(n))


def test_no_file_points_outside_the_repository():
    # Spelled in pieces so that this file does not match itself.
    forbidden = re.compile("|".join(re.escape(s) for s in ("../" + "shared", "MATH" + ".md", "/" + "work/")))
    offenders = []
    for path in _repo_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary (figures)
        offenders += [f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}"
                      for i, line in enumerate(text.splitlines(), 1) if forbidden.search(line)]
    assert not offenders, "\n".join(offenders)


def test_license_and_citation():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert "Copyright (c) 2026 gsa_kernels contributors" in license_text
    assert PYPROJECT["project"]["license"] == "MIT"
    assert "LICENSE" in PYPROJECT["project"]["license-files"]
    citation = (ROOT / "CITATION.cff").read_text()
    readme = (ROOT / "README.md").read_text()
    assert citation.startswith("cff-version:") and "## Citing" in readme
    titles = re.findall(r'^\s+title: "(.*)"$', citation, re.M)  # indented: the references
    assert len(titles) == 4
    citing = " ".join(readme.split("## Citing", 1)[1].split())
    for title in titles:
        assert title in citing, title


def test_demo_extra_holds_the_demo_dependencies(monkeypatch):
    from gsa_kernels.demo import pipeline

    assert sorted(PYPROJECT["project"]["optional-dependencies"]["demo"]) == sorted(pipeline.DEMO_DEPENDENCIES.values())
    real_find_spec = pipeline.importlib.util.find_spec
    monkeypatch.setattr(pipeline.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=re.escape("pip install 'gsa_kernels[demo]'")):
        pipeline.run(["--out", os.devnull])


@pytest.mark.parametrize("extra", ["test", "demo"])
def test_extras_are_pinned_in_requirements(extra):
    pins_file = ROOT / "requirements" / f"{extra}.txt"
    if not pins_file.exists():
        pytest.skip("requirements/ is not shipped in the sdist")
    pinned = {re.split(r"[=<>~!; \[]", line, maxsplit=1)[0].lower().replace("_", "-")
              for line in pins_file.read_text().splitlines() if line and not line.startswith(("#", "-"))}
    for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
        name = re.split(r"[=<>~!; \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pinned, f"[{extra}] extra {requirement!r} has no pin in {pins_file.name}"
