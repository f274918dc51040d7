"""The compiled-kernel cache never loads a library another user could have planted or changed.

Each test plants a library whose constructor writes a marker file when it is loaded, in a place the
loader would look, then checks that the marker never appears, that a warning names the cause, and
that the scan still works (from a private build)."""

import hashlib
import os
import shutil
import stat
import subprocess

import pytest
import torch

from storm_vlm.model.ssm import cpu_kernel, selective_scan, selective_scan_reference
from test_scan import _assert_close, _inputs, _run

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs cc")

EVIL_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("loaded", f); fclose(f); }
}
int storm_scan_lanes(void) { return 4; }
"""


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fresh cache under tmp_path; the loader's memory of earlier builds and warnings cleared."""
    monkeypatch.setenv("STORM_VLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "cc")
    monkeypatch.setattr(cpu_kernel, "_libs", {})
    monkeypatch.setattr(cpu_kernel, "_warned", set())
    return tmp_path / "cache" / "kernels"


@pytest.fixture
def evil(tmp_path):
    """(bytes of a library that writes tmp_path/marker when loaded, the marker's path)."""
    marker = tmp_path / "marker"
    src = tmp_path / "evil.c"
    src.write_text(EVIL_C % marker)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "evil.so"), str(src)], check=True)
    return (tmp_path / "evil.so").read_bytes(), marker


def _slow(*values):
    """Further cases of one check: each builds the kernels privately (seconds), so they run with -m slow."""
    return [pytest.param(v, marks=pytest.mark.slow) for v in values]


def _build_name():
    spec = cpu_kernel.ISAS["generic"]
    return f"scan-generic-{spec.lanes}-{cpu_kernel._key('cc', spec, spec.lanes)}"


def _plant(folder, data, mode=0o700, file_mode=0o600):
    """A build folder holding ``data`` with its correct recorded hash."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lib.so").write_bytes(data)
    (folder / "lib.so.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    for name in ("lib.so", "lib.so.sha256"):
        os.chmod(folder / name, file_mode)
    os.chmod(folder, mode)


def _loads_privately(caplog, match):
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        lib = cpu_kernel.build("generic")
    assert lib.storm_origin == "a private temporary build"
    assert match in caplog.text, caplog.text
    return lib


def _scan_works(monkeypatch, lib):
    monkeypatch.setattr(cpu_kernel, "load", lambda *a, **k: lib)
    t = _inputs(torch.float32, b=2, d=12, L=20)
    _assert_close(_run(selective_scan, t, True, chunk=8), _run(selective_scan_reference, t, True),
                  rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", [0o770, *_slow(0o707, 0o777)])
def test_group_or_world_writable_cache_folder_is_refused(monkeypatch, cache, evil, caplog, mode):
    data, marker = evil
    _plant(cache / _build_name(), data)
    os.chmod(cache, mode)
    lib = _loads_privately(caplog, "writable by group or others")
    assert not marker.exists()
    assert stat.S_IMODE(cache.stat().st_mode) == mode  # refused, not silently changed
    _scan_works(monkeypatch, lib)


@pytest.mark.parametrize("what", ["cache", *_slow("build", "lib")])
def test_cache_entries_owned_by_another_user_are_refused(monkeypatch, cache, evil, caplog, what):
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    data, marker = evil
    _plant(cache / _build_name(), data)
    path = {"cache": cache, "build": cache / _build_name(), "lib": cache / _build_name() / "lib.so"}[what]
    os.chown(path, 4242, -1)
    _loads_privately(caplog, "owned by uid 4242")
    assert not marker.exists()


@pytest.mark.parametrize("where", ["build", *_slow("lib", "hash")])
def test_group_writable_build_or_file_is_refused(cache, evil, caplog, where):
    data, marker = evil
    folder = cache / _build_name()
    _plant(folder, data)
    os.chmod(cache, 0o700)
    os.chmod({"build": folder, "lib": folder / "lib.so", "hash": folder / "lib.so.sha256"}[where],
             0o770 if where == "build" else 0o620)
    _loads_privately(caplog, "writable by group or others")
    assert not marker.exists()


def test_tampered_library_is_refused_and_never_loaded(monkeypatch, cache, evil, caplog):
    data, marker = evil
    good = cpu_kernel.build("generic")  # a genuine cached build
    folder = cache / _build_name()
    assert good.storm_origin == str(folder / "lib.so")
    os.chmod(folder / "lib.so", 0o600)
    (folder / "lib.so").write_bytes(data)  # replaced in place: the recorded hash no longer matches
    monkeypatch.setattr(cpu_kernel, "_libs", {})
    lib = _loads_privately(caplog, "does not match its recorded SHA-256")
    assert not marker.exists()
    _scan_works(monkeypatch, lib)


def test_missing_hash_is_refused(cache, evil, caplog):
    data, marker = evil
    folder = cache / _build_name()
    _plant(folder, data)
    os.chmod(cache, 0o700)
    (folder / "lib.so.sha256").unlink()
    _loads_privately(caplog, "has no lib.so.sha256")
    assert not marker.exists()


def test_symlinked_build_folder_is_refused(cache, evil, tmp_path, caplog):
    data, marker = evil
    elsewhere = tmp_path / "elsewhere"
    _plant(elsewhere, data)  # private and correctly hashed, but reached through a link
    cache.mkdir(parents=True, mode=0o700)
    os.symlink(elsewhere, cache / _build_name())
    _loads_privately(caplog, "cannot open kernel build folder")
    assert not marker.exists()


def test_load_warns_once_and_falls_back_to_a_private_build(monkeypatch, cache, caplog):
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    monkeypatch.setenv(cpu_kernel.ENV_ISA, "generic")
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        lib = cpu_kernel.load()
        cpu_kernel.load(lanes=8)  # another build: the same cause is not warned about twice
    assert lib is not None and lib.storm_origin == "a private temporary build"
    assert caplog.text.count("writable by group or others") == 1
    assert list(cache.iterdir()) == []  # nothing was written into the unsafe folder
