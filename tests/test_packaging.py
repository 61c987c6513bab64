"""The source distribution holds what a build from it needs: the C kernels,
the Cython module, the build files, the README and the demo's data.

The sdist is built without build isolation when this environment has the
build requirements that setup.py imports (setuptools, Cython), else in an
isolated environment (pip fetches them, as ``pip install .`` does)."""
import importlib.util
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                "*.so", ".pytest_cache", ".benchmarks", ".hypothesis")


@pytest.fixture(scope="module")
def sdist_members(tmp_path_factory):
    """The names in an sdist built from a copy of the source tree (so that
    building leaves nothing behind in it), without the top folder."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    in_place = all(importlib.util.find_spec(m) for m in ("setuptools", "Cython"))
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist",
                           *(["--no-isolation"] if in_place else []),
                           "--outdir", str(tmp / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (archive,) = (tmp / "dist").glob("fastrnn-*.tar.gz")
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_sdist_has_build_inputs_docs_and_data(sdist_members):
    expected = {"pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in",
                "fastrnn/_cykernels.pyx", "fastrnn/__init__.py", "fastrnn/cli.py",
                "fastrnn/keras/__init__.py",
                "fastrnn/data/tinyshakespeare.txt.gz", "fastrnn/data/README.md"}
    expected |= {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.[ch]")}
    assert any(name.endswith(".c") for name in expected)
    assert any(name.endswith(".h") for name in expected)
    missing = expected - sdist_members
    assert not missing, f"missing from the sdist: {sorted(missing)}"


def test_sdist_has_no_build_products(sdist_members):
    built = [n for n in sdist_members if n.endswith((".so", ".pyd", ".pyc", ".o"))]
    assert not built
