"""The CPU kernels on machines that differ from the developer's: no usable cache folder, a damaged
cached build, several processes building at once, a compiler that is missing or broken, a process
forked after the worker threads started. Whatever happens, the model keeps working (kernels from a
private build, or PyTorch), with one clear warning, and nothing half-written is ever loaded.

Most tests replace the compiler with a fake that returns fixed bytes (the cache logic is what they
check); the ones marked slow build the real library."""

import hashlib
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest

from storm_vlm.model.ssm import _threads, cpu_kernel

FAKE = b"\x7fELF built by the fake compiler"
ISA = cpu_kernel.ISAS["generic"]
NAME = "scan-generic-4-key"
PRIVATE = "a private temporary build"


@pytest.fixture
def compiles(monkeypatch, tmp_path):
    """A fresh cache under tmp_path, the loader's memory cleared, and a fake compiler; returns the
    file that gets one line per compilation (shared with forked processes)."""
    log = tmp_path / "compiles.log"
    log.touch()

    def fake_compile(cc, isa, lanes, folder):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough for processes started together to overlap
        return FAKE

    monkeypatch.setenv("STORM_VLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernel, "_compile", fake_compile)
    monkeypatch.setattr(cpu_kernel, "_key", lambda cc, isa, lanes: "key")
    monkeypatch.setattr(cpu_kernel, "_libs", {})
    monkeypatch.setattr(cpu_kernel, "_warned", set())
    return log


def _count(log) -> int:
    return len(log.read_text().split())


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_cache_under_a_file_still_gives_the_kernels(monkeypatch, tmp_path, compiles, caplog):
    """A cache that cannot be created (a read-only home, HOME=/nonexistent, a path through a file):
    a private build and a warning that says what to set, not the PyTorch fallback."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("STORM_VLM_CACHE", str(tmp_path / "file" / "cache"))
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        for _ in range(2):
            assert cpu_kernel._library_bytes("cc", ISA, 4) == (FAKE, PRIVATE)
    assert len(_warnings(caplog)) == 1 and "STORM_VLM_CACHE" in caplog.text


def test_no_home_folder_means_no_cache_not_a_folder_named_tilde(monkeypatch, tmp_path, compiles, caplog):
    """HOME unset for a uid without a passwd entry (a container run under an arbitrary uid): "~"
    cannot be expanded and must not become a relative folder in the working directory."""
    for var in ("STORM_VLM_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cpu_kernel.os.path, "expanduser", lambda path: path)
    monkeypatch.chdir(tmp_path)
    assert cpu_kernel.cache_dir() is None
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        assert cpu_kernel._library_bytes("cc", ISA, 4) == (FAKE, PRIVATE)
    assert not (tmp_path / "~").exists()
    assert "HOME is unset" in caplog.text and "STORM_VLM_CACHE" in caplog.text


def test_a_full_cache_disk_still_gives_the_kernels(monkeypatch, tmp_path, compiles, caplog):
    cache = tmp_path / "cache" / "kernels"
    real = cpu_kernel.tempfile.mkdtemp

    def full(*args, dir=None, **kw):
        if dir is not None and os.path.samefile(dir, cache):
            raise OSError(28, "No space left on device")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(cpu_kernel.tempfile, "mkdtemp", full)
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        assert cpu_kernel._library_bytes("cc", ISA, 4) == (FAKE, PRIVATE)
    assert "No space left on device" in caplog.text
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "empty", "no hash"])
def test_damaged_cached_build_is_replaced_never_loaded(compiles, caplog, damage):
    """A build of this user's left damaged (a crash or a full disk while it was saved): refused,
    and replaced, so that the next process loads a good one instead of rebuilding forever."""
    folder = cpu_kernel._private_cache() / NAME
    folder.mkdir(mode=0o700)
    good_hash = hashlib.sha256(FAKE).hexdigest() + "\n"
    lib, recorded = {"truncated": (FAKE[:7], good_hash), "empty": (b"", ""), "no hash": (FAKE, None)}[damage]
    (folder / "lib.so").write_bytes(lib)
    if recorded is not None:
        (folder / "lib.so.sha256").write_text(recorded)
    for f in folder.iterdir():
        f.chmod(0o600)
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        assert cpu_kernel._library_bytes("cc", ISA, 4) == (FAKE, PRIVATE)
    assert "not loading the cached scan kernel" in caplog.text
    assert (folder / "lib.so").read_bytes() == FAKE and (folder / "lib.so.sha256").read_text() == good_hash
    assert cpu_kernel._library_bytes("cc", ISA, 4) == (FAKE, str(folder / "lib.so"))
    assert _count(compiles) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == [NAME]  # nothing left beside it


def _build_in_child(queue):
    data, origin = cpu_kernel._library_bytes("cc", ISA, 4)
    queue.put((data, origin))


def test_processes_building_at_once_compile_once(compiles):
    """The ranks of a job (or test workers) starting together: one compiles, the others wait for it
    and load its build; every process gets the whole library."""
    ctx = multiprocessing.get_context("fork")  # the children keep this test's fake compiler
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(queue,)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    cache = cpu_kernel.cache_dir()
    assert results == [(FAKE, str(cache / NAME / "lib.so"))] * 4
    assert _count(compiles) == 1
    assert sorted(p.name for p in cache.iterdir()) == [NAME]
    assert stat.S_IMODE((cache / NAME / "lib.so").stat().st_mode) == 0o600


def _script(folder, name, body):
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_no_compiler_on_path_warns_once_and_never_retries(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(cpu_kernel, "_libs", {})
    monkeypatch.setattr(cpu_kernel, "_warned", set())
    builds = []
    real = cpu_kernel.build
    monkeypatch.setattr(cpu_kernel, "build", lambda *a, **k: builds.append(a) or real(*a, **k))
    assert cpu_kernel._compiler() is None
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        assert all(cpu_kernel.load_library() is None for _ in range(3))
    assert len(builds) == 1
    (warning,) = _warnings(caplog)
    assert "no C compiler" in warning


def test_cc_that_is_not_found_is_named_not_silently_replaced(monkeypatch, tmp_path, caplog):
    cc = _script(tmp_path / "bin", "cc", "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(cpu_kernel, "_warned", set())
    for wanted in ("clang-99", "ccache gcc"):
        monkeypatch.setenv("CC", wanted)
        with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
            assert cpu_kernel._compiler() == str(cc)
        assert f"CC={wanted} is not a program found on PATH" in caplog.text and str(cc) in caplog.text
    monkeypatch.setenv("CC", "cc")
    assert cpu_kernel._compiler() == str(cc)


@pytest.mark.parametrize("body,shown", [
    ("echo 'fatal error: stdint.h: No such file or directory' >&2; exit 1", "stdint.h: No such file or directory"),
    ("exit 3", "exit status 3"),
])
def test_broken_compiler_gives_one_short_warning(monkeypatch, tmp_path, caplog, body, shown):
    """A compiler that fails every source (missing headers, a wrapper that exits): PyTorch is used,
    and the one warning shows the cause once, not once per source and instruction set."""
    monkeypatch.setenv("CC", str(_script(tmp_path / "bin", "badcc", body)))
    monkeypatch.setenv("STORM_VLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernel, "detect_isa", lambda: "avx512bf16")  # every path is tried, all fail
    monkeypatch.delenv(cpu_kernel.ENV_ISA, raising=False)
    monkeypatch.setattr(cpu_kernel, "_libs", {})
    monkeypatch.setattr(cpu_kernel, "_warned", set())
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        assert cpu_kernel.load_library() is None
        assert cpu_kernel.load_library() is None
    (warning,) = _warnings(caplog)
    assert "CPU kernels unavailable" in warning and warning.count(shown) == 1, warning


def _pool_job_in_child(queue):
    queue.put(_threads.run_all(lambda x: 2 * x, [(1,), (2,), (3,)]))


def test_forked_child_runs_jobs_on_a_pool_of_its_own():
    """A process forked after the worker pool ran (a multiprocessing or DataLoader worker, a
    pre-forking server) must not queue jobs for the parent's threads, which do not exist there."""
    workers = _threads._get_pool(1)._max_workers
    everyone = threading.Barrier(workers + 1)  # each job waits for the others: every worker starts
    _threads.run_all(lambda: everyone.wait(timeout=10), [()] * (workers + 1))
    time.sleep(0.2)  # the workers go idle
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_pool_job_in_child, args=(queue,))
    child.start()
    child.join(timeout=15)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the forked child hung on the parent's thread pool")
    assert child.exitcode == 0 and queue.get(timeout=5) == [2, 4, 6]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs cc")
def test_real_builds_in_parallel_processes(tmp_path):
    """Three fresh interpreters build the real library into one empty cache at once: one build
    folder, every process loads a working library."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from storm_vlm.model.ssm import cpu_kernel\n"
            "lib = cpu_kernel.build('generic'); print(lib.storm_origin, lib.storm_scan_lanes())\n")
    env = {**os.environ, "STORM_VLM_CACHE": str(tmp_path), "CC": "cc", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=600)[0].split() for p in procs]
    (folder,) = (tmp_path / "kernels").iterdir()
    assert outs == [[str(folder / "lib.so"), "4"]] * 3
