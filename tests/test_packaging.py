"""The package as pip installs it from a wheel (not the editable checkout the tests import)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_every_file_of_the_package(tmp_path):
    """Every file under src/storm_vlm is in the built wheel: the C kernels' sources (compiled on first
    use, so a missing one leaves every install without the kernels) as well as the modules."""
    tree = tmp_path / "tree"  # built from a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(tree), "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("storm_vlm-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(tree / "src")) for p in (tree / "src" / "storm_vlm").rglob("*") if p.is_file()}
    assert any(name.endswith("_attention_kernel.c") for name in sources)
    assert sorted(sources - packaged) == []
