"""The CPU kernels, compiled on first use into one library: the fused selective scan, forward and
backward (``_scan_kernel.c``), the one-token decode step of a Llama-style layer stack
(``_decode_kernel.c``, used by ``storm_vlm.model.decode.DecodeStep``) and one-pass element-wise
functions (``_elementwise_kernel.c``: the tanh-GELU of fast_paths, the mixers' conv + SiLU) and
softmax attention with LayerNorm (``_attention_kernel.c``, called by ``storm_vlm.model.cpu_attention``
for the vision layers and the LLM's causal prefill), a whole ViT encoder layer per frame
(``_vit_layer_kernel.c``, ``storm_vlm.model.cpu_vit_layer``) and nn.Linear's product
(``_linear_kernel.c``, a backend of ``storm_vlm.model.matmul_backend``); all include ``_vec.h``.

**Instruction set.** The C source ships with the package and is compiled with the system C compiler
(``$CC``, else cc / gcc / clang) once per instruction set, with that set's flags, never
``-march=native`` (so a forced narrower path really avoids the wider instructions):

========== ===== ======================================================= ================================
path       lanes flags                                                   chosen when /proc/cpuinfo lists
========== ===== ======================================================= ================================
avx512bf16 16    avx512's and -mavx512bf16                               avx512's and avx512_bf16
avx512     16    -mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma avx512f avx512dq avx512bw avx512vl
                                                                         avx2 fma
avx2       8     -mavx2 -mfma                                            avx2 fma
generic    4     (the compiler's baseline: SSE2 on x86-64, NEON on       always (the portable fallback)
                 aarch64; 4 lanes = one 128-bit register there)
========== ===== ======================================================= ================================

avx512bf16 is avx512 plus bf16 instructions (Cooper Lake, Sapphire Rapids and later Xeons, Zen 4):
the attention multiplies bf16 arrays as bf16 dot products, bf16 results are rounded in one
instruction; float32 code is avx512's.

The CPU check reads the ``flags`` line of /proc/cpuinfo (Linux lists a feature there only when the
kernel also enables its registers); where that file does not exist it asks
``torch.backends.cpu.get_cpu_capability()``. Never the vendor name. ``STORM_VLM_SCAN_ISA=avx2`` (or
``generic``, ``avx512``, ``avx512bf16``) forces a narrower path; asking for one the CPU lacks warns and uses the
detected one. A wider path that fails to build falls back to the next narrower one, with a warning.
``STORM_VLM_SCAN_KERNEL=0`` turns the scan kernel off (the benchmarks use it to time both paths; the
decode step has its own switch, see fast_paths).

**Cache and its checks.** Builds are cached per user under ``$STORM_VLM_CACHE/kernels`` (else
``$XDG_CACHE_HOME/storm_vlm/kernels``, else ``~/.cache/storm_vlm/kernels``), one folder per build
keyed by the source, compiler version, flags and machine: ``scan-<key>/lib.so`` beside
``lib.so.sha256``, the SHA-256 recorded when it was built. A build is compiled in a private
temporary folder, then written into a private temporary folder inside the cache and renamed into
place whole, so no process sees half of one. Processes that need the same build at once (the ranks
of one job, test workers) take turns on a lock of the cache folder, so one compiles and the others
find its build (where the file system has no locks, each compiles its own; the renames keep that safe).
Because loading a library runs its code, nothing is loaded from the cache unless the cache folder,
the build's folder and both files are owned by this user and not writable by group or others
(checked on open file descriptors, not on path names that could be swapped in between), and the
library's bytes hash to the recorded value. Those very bytes are then loaded, from an anonymous
in-memory file (``memfd_create``), so the file cannot change between the check and the load. On any
failed check: a warning (once per cause) and a fresh build in a private temporary folder, loaded the
same way and deleted; never the unverified file. A build of this user's that lacks a file or fails
its hash (a crash or a full disk while it was saved) is replaced by that fresh build. A cache that
cannot be used at all (no home folder, a read-only or full disk) costs the same warning and a
private build per process, never the kernels. Without a compiler, or when every build fails,
``load()`` warns once and returns None, and the pure-PyTorch scan is used instead.

Why ctypes and not a torch C++ extension: the kernel needs no torch headers, so it builds in
seconds instead of minutes, and ctypes releases the GIL during the call, so channel
blocks scanned in worker threads really run in parallel.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # not POSIX: the cache is not used there (see _private_cache)
    fcntl = None

__all__ = ["load", "load_library", "build", "enabled", "switched_off", "switched_on", "scan_forward", "scan_backward",
           "mixer_direction",
           "cache_dir", "cpu_flags", "detect_isa", "selected_isa", "ISAS", "Isa", "UnsafeCacheError"]

logger = logging.getLogger("storm_vlm.model.ssm")
SOURCES = tuple(Path(__file__).with_name(n) for n in ("_scan_kernel.c", "_decode_kernel.c", "_elementwise_kernel.c",
                                                       "_attention_kernel.c", "_vit_layer_kernel.c",
                                                       "_linear_kernel.c"))
HEADER = Path(__file__).with_name("_vec.h")
BASE_FLAGS = ["-O3", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]
ENV_SWITCH = "STORM_VLM_SCAN_KERNEL"
ENV_ISA = "STORM_VLM_SCAN_ISA"
LIB_NAME = "lib.so"
HASH_NAME = LIB_NAME + ".sha256"


@dataclass(frozen=True)
class Isa:
    """One build of the kernel: its name, vector width, compiler flags and the CPU features it needs."""

    name: str
    lanes: int
    flags: tuple[str, ...]
    cpu_features: tuple[str, ...]


_AVX512_FLAGS = ("-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma")
_AVX512_FEATURES = ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma")
ISAS = {  # narrowest first
    "generic": Isa("generic", 4, (), ()),
    "avx2": Isa("avx2", 8, ("-mavx2", "-mfma"), ("avx2", "fma")),
    "avx512": Isa("avx512", 16, _AVX512_FLAGS, _AVX512_FEATURES),
    "avx512bf16": Isa("avx512bf16", 16, (*_AVX512_FLAGS, "-mavx512bf16"), (*_AVX512_FEATURES, "avx512_bf16")),
}
_ORDER = list(ISAS)

_lock = threading.Lock()
_libs: dict[tuple[str, int], ctypes.CDLL | None] = {}
_warned: set[str] = set()


class UnsafeCacheError(RuntimeError):
    """A cache folder or file that another user could have written, or a library that fails its hash."""


class _DamagedBuild(UnsafeCacheError):
    """A build folder that passed the ownership checks (only this user wrote it) but lacks a file or
    fails its hash: a crash or a full disk while it was saved. Replaced, never loaded."""


OFF_VALUES = ("0", "false", "off", "no")  # what turns a STORM_VLM_*_KERNEL switch off


def switched_off(variable: str) -> bool:
    """True when the environment variable `variable` is set to 0/false/off/no (any case)."""
    return os.environ.get(variable, "").strip().lower() in OFF_VALUES


def switched_on(variable: str) -> bool:
    """True when the environment variable `variable` is set to 1/true/on/yes (any case): a switch
    that pins a kernel instead of letting it be timed against the alternative."""
    return os.environ.get(variable, "").strip().lower() in ("1", "true", "on", "yes")


def enabled() -> bool:
    """False when ``STORM_VLM_SCAN_KERNEL`` is set to 0/false/off/no."""
    return not switched_off(ENV_SWITCH)


def cache_dir() -> Path | None:
    """Where builds are cached (see the module docstring); None when no variable names a folder and
    this user has no home folder (HOME unset and no passwd entry, as in a container run under an
    arbitrary uid), where "~" would otherwise become a folder named "~" in the working directory."""
    if os.environ.get("STORM_VLM_CACHE"):
        return Path(os.environ["STORM_VLM_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return None if base.startswith("~") else Path(base) / "storm_vlm" / "kernels"


def _warn_once(msg: str, *args) -> None:
    text = msg % args
    if text not in _warned:
        _warned.add(text)
        logger.warning(text)


# ----------------------------------------------------------------------------- which instruction set
def cpu_flags() -> set[str] | None:
    """The CPU feature flags Linux reports (x86: the ``flags`` line), or None where there is no /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return set()


@functools.lru_cache(maxsize=None)
def detect_isa() -> str:
    """The widest path this CPU runs: 'avx512bf16', 'avx512', 'avx2' or 'generic' (see the module docstring)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "generic"
    flags = cpu_flags()
    if flags is None:  # no /proc/cpuinfo: ask PyTorch's own CPU check
        cap = torch.backends.cpu.get_cpu_capability().upper()
        return "avx512" if cap.startswith("AVX512") else "avx2" if cap == "AVX2" else "generic"
    for name in reversed(_ORDER):
        if set(ISAS[name].cpu_features) <= flags:
            return name
    return "generic"


def selected_isa(want: str | None = None) -> str:
    """The path ``load()`` uses: ``want`` (default: ``STORM_VLM_SCAN_ISA``, else the detected path),
    never one wider than the CPU runs (asking for one warns and gives the detected path)."""
    best = detect_isa()
    what = "asked for " if want else f"{ENV_ISA}="
    want = (want or os.environ.get(ENV_ISA, "")).strip().lower()
    if not want:
        return best
    if want not in ISAS:
        _warn_once("storm_vlm: %s%s is not one of %s; using %s", what, want, ", ".join(_ORDER), best)
        return best
    if _ORDER.index(want) > _ORDER.index(best):
        _warn_once("storm_vlm: %s%s needs instructions this CPU does not report; using %s", what, want, best)
        return best
    return want


# ----------------------------------------------------------------------------- build
def _compiler() -> str | None:
    """The path of ``$CC``, else of cc / gcc / clang, whichever is found first. ``$CC`` must name one
    program (a name on PATH or a path, without options: the cache key does not see options); one
    that is not found is warned about, not silently replaced."""
    want = os.environ.get("CC", "").strip()
    if want and shutil.which(want):
        return shutil.which(want)
    found = next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if want:
        _warn_once("storm_vlm: CC=%s is not a program found on PATH (name one compiler, without options); "
                   "building the CPU kernels with %s", want, found or "nothing: none of cc, gcc, clang is installed")
    return found


def _flags(isa: Isa, lanes: int) -> list[str]:
    return [*BASE_FLAGS, *isa.flags, f"-DSTORM_LANES={lanes}"]


def _key(cc: str, isa: Isa, lanes: int) -> str:
    """Cache key of one build: source, compiler version, flags (ISA and width included), machine."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = b"\0".join(p.read_bytes() for p in (*SOURCES, HEADER))
    parts = (sources, version, " ".join(_flags(isa, lanes)), isa.name, platform.machine())
    return hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in parts)).hexdigest()[:24]


def _compile(cc: str, isa: Isa, lanes: int, folder: Path) -> bytes:
    """Compile into ``folder``/lib.so and return the library's bytes. Each source compiles in a
    process of its own, side by side (the build takes as long as its slowest source where there are
    cores for them), then the objects are linked and removed. A failure raises RuntimeError with the
    first failing source's errors (a broken toolchain fails every source the same way)."""
    lib = folder / LIB_NAME
    flags = [*_flags(isa, lanes), f"-I{HEADER.parent}"]
    objects = [folder / f"{p.stem}.o" for p in SOURCES]
    procs = [subprocess.Popen([cc, *flags, "-c", "-o", str(o), str(p)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for p, o in zip(SOURCES, objects)]
    errors = []
    try:
        for source, proc in zip(SOURCES, procs):
            try:
                err = proc.communicate(timeout=300)[1]
            except subprocess.TimeoutExpired:
                proc.kill()
                err = proc.communicate()[1] + "\n(timed out after 300 s)"
            if proc.returncode != 0:
                errors.append(f"{source.name}: {err.strip()[-1000:] or f'exit status {proc.returncode}'}")
        if not errors:
            link = subprocess.run([cc, *flags, "-o", str(lib), *map(str, objects)], capture_output=True, text=True,
                                  timeout=300)
            if link.returncode != 0:
                errors.append(f"linking: {link.stderr.strip()[-1000:] or f'exit status {link.returncode}'}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for o in objects:
            o.unlink(missing_ok=True)
    if errors:
        count = f" ({len(errors)} of {len(SOURCES)} sources)" if len(errors) > 1 else ""
        raise RuntimeError(f"{cc} failed for {isa.name}{count}: {errors[0]}")
    return lib.read_bytes()


def _compile_private(cc: str, isa: Isa, lanes: int) -> bytes:
    """Compile in a private temporary folder (0700, in $TMPDIR), removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="storm_vlm_scan_"))
    try:
        return _compile(cc, isa, lanes, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_private(st: os.stat_result, what: str, kind) -> None:
    """Raise UnsafeCacheError unless st is a ``kind`` (stat.S_ISDIR / S_ISREG) owned by this user and
    not writable by group or others."""
    if not kind(st.st_mode):
        raise UnsafeCacheError(f"{what} is not a {'folder' if kind is stat.S_ISDIR else 'regular file'}")
    if st.st_uid != os.geteuid():
        raise UnsafeCacheError(f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                               f"chmod go-w it, or point STORM_VLM_CACHE at a private folder")


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)


def _open_private(name, flags, kind, what, dir_fd=None) -> int:
    """os.open + the ownership/mode check on the open descriptor (no symlinks followed). A missing
    entry raises FileNotFoundError; anything else that fails, UnsafeCacheError."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:  # e.g. ELOOP: a symlink where a folder or file should be
        raise UnsafeCacheError(f"cannot open {what} safely ({exc.strerror})") from None
    try:
        _check_private(os.fstat(fd), what, kind)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_verified(cache: Path, name: str) -> bytes | None:
    """The bytes of cache/name/lib.so after every check passes; None when that build does not exist.
    Raises UnsafeCacheError when a check fails."""
    root = _open_private(cache, _DIR_FLAGS, stat.S_ISDIR, f"kernel cache folder {cache}")
    try:
        try:
            sub = _open_private(name, _DIR_FLAGS, stat.S_ISDIR, f"kernel build folder {cache / name}", dir_fd=root)
        except FileNotFoundError:
            return None
        try:
            fds = []
            for n in (LIB_NAME, HASH_NAME):
                try:
                    fds.append(_open_private(n, _FILE_FLAGS, stat.S_ISREG, f"kernel file {cache / name / n}",
                                             dir_fd=sub))
                except FileNotFoundError:
                    for fd in fds:
                        os.close(fd)
                    raise _DamagedBuild(f"kernel build folder {cache / name} has no {n}") from None
            try:
                data, recorded = (_read_all(fd) for fd in fds)
            finally:
                for fd in fds:
                    os.close(fd)
        finally:
            os.close(sub)
    finally:
        os.close(root)
    if hashlib.sha256(data).hexdigest() != recorded.decode("ascii", "replace").strip():
        raise _DamagedBuild(f"kernel library {cache / name / LIB_NAME} does not match its recorded SHA-256")
    return data


def _private_cache() -> Path:
    """The cache folder, created private (0700) when missing; raises UnsafeCacheError when it is not,
    OSError when there is none or it cannot be created."""
    if not hasattr(os, "geteuid"):
        raise UnsafeCacheError("file ownership cannot be checked on this platform")
    cache = cache_dir()
    if cache is None:
        raise OSError("HOME is unset and this user has no home folder")
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        cache.mkdir(mode=0o700)
    except FileExistsError:
        pass
    os.close(_open_private(cache, _DIR_FLAGS, stat.S_ISDIR, f"kernel cache folder {cache}"))
    return cache


_LOCK_WAIT_S = 900  # longer than a build may take (its compile and link time out at 300 s each)


@contextlib.contextmanager
def _cache_lock(cache: Path):
    """Hold the cache folder's lock (``flock`` on the folder itself: no lock file to leave behind)
    while a build is looked up, compiled and saved, so processes needing it at once compile it once.
    Where the file system has no locks, or the holder does not finish in _LOCK_WAIT_S (a stopped
    process), go on without: saving a build is atomic either way."""
    fd = os.open(cache, _DIR_FLAGS)
    try:
        deadline = time.monotonic() + _LOCK_WAIT_S
        while fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            except OSError:
                break
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_private(folder: Path, name: str, data: bytes) -> None:
    """Write a new file folder/name, mode 0600 whatever the umask (the loader refuses files others
    can write), synced to disk."""
    fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)  # on disk before the rename makes it visible: no empty library after a power loss
    finally:
        os.close(fd)


def _publish(cache: Path, name: str, data: bytes, replace: bool = False) -> bool:
    """Save a build as cache/name: written into a private temporary folder in the cache, then renamed
    into place whole. ``replace``: a damaged build of this user's is there, removed first. True when
    the build is there now (ours, or another process's that won the race); False, with a warning,
    when the cache cannot take it (a read-only folder, a full disk)."""
    try:
        if replace:
            trash = tempfile.mkdtemp(prefix=".damaged-", dir=cache)
            os.rename(cache / name, os.path.join(trash, name))
            shutil.rmtree(trash, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))  # 0700, ours
        try:
            _write_private(tmp, LIB_NAME, data)
            _write_private(tmp, HASH_NAME, (hashlib.sha256(data).hexdigest() + "\n").encode())
            try:
                os.rename(tmp, cache / name)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        _warn_once("storm_vlm: cannot save the CPU kernels in %s (%s); every new process builds them again",
                   cache, exc)
        return False
    return True


_UNSAFE = "storm_vlm: not loading the cached scan kernel (%s); building a private copy instead"


def _library_bytes(cc: str, isa: Isa, lanes: int) -> tuple[bytes, str]:
    """(the library's bytes, where they came from): a verified cached build, a new one saved into the
    cache, or, when the cache fails a check or cannot be used, a build in a private temporary folder."""
    name = f"scan-{isa.name}-{lanes}-{_key(cc, isa, lanes)}"
    private = "a private temporary build"
    try:
        cache = _private_cache()
    except UnsafeCacheError as exc:
        _warn_once(_UNSAFE, exc)
        return _compile_private(cc, isa, lanes), private
    except OSError as exc:  # no home folder, a read-only or full disk: the kernels all the same
        _warn_once("storm_vlm: no kernel cache (%s); every new process builds the CPU kernels again "
                   "(set STORM_VLM_CACHE to a writable folder)", exc)
        return _compile_private(cc, isa, lanes), private
    with _cache_lock(cache):
        try:
            data = _read_verified(cache, name)
        except UnsafeCacheError as exc:
            _warn_once(_UNSAFE, exc)
            data = _compile_private(cc, isa, lanes)
            if isinstance(exc, _DamagedBuild):
                _publish(cache, name, data, replace=True)
            return data, private
        if data is not None:
            return data, str(cache / name / LIB_NAME)
        data = _compile_private(cc, isa, lanes)
        return data, str(cache / name / LIB_NAME) if _publish(cache, name, data) else private


_memfds: list[int] = []  # kept open: the dynamic loader identifies a library by its path name, and
# a closed descriptor's number (hence "/proc/self/fd/N") would be reused by the next build loaded


def _dlopen_bytes(data: bytes) -> ctypes.CDLL:
    """Load a shared library from these exact bytes: an anonymous in-memory file where the platform
    has one, else a fresh file in a private temporary folder (removed once loaded)."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("storm_vlm_scan", 0)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
        except BaseException:
            os.close(fd)
            raise
        _memfds.append(fd)
        return lib
    tmp = Path(tempfile.mkdtemp(prefix="storm_vlm_scan_"))
    try:
        path = tmp / LIB_NAME
        path.write_bytes(data)
        return ctypes.CDLL(str(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bind(lib: ctypes.CDLL, isa: Isa, lanes: int, origin: str) -> ctypes.CDLL:
    lib.storm_scan_lanes.restype = ctypes.c_int
    if lib.storm_scan_lanes() != lanes:
        raise RuntimeError(f"scan kernel built for {lanes} lanes reports {lib.storm_scan_lanes()}")
    lib.storm_scan_vector_isa.restype = ctypes.c_char_p
    fn = lib.storm_scan_fwd_f32
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    fn.argtypes = ([i64] * 5 + [ptr, i64, i64, i64] * 2 + [ptr, i64] + [ptr, i64, i64, i64] + [ptr]
                   + [ptr, i64, i64] * 2 + [cint] * 2 + [ptr] * 2 + [cint] * 2 + [ptr]
                   + [ptr, i64, i64, i64, ptr, i64, ptr, i64, i64] + [cint])
    fn.restype = cint
    lib.storm_mixer_direction_f32.argtypes = ([i64] * 6 + [ptr, i64, i64] + [ptr] * 2 + [ptr, i64] + [ptr] * 5
                                              + [ptr, i64, i64] + [ptr, cint, cint, ptr, ptr])
    lib.storm_mixer_direction_f32.restype = cint
    bwd = lib.storm_scan_bwd_f32
    bwd.argtypes = ([i64] * 5 + [ptr, i64, i64, i64] * 4 + [ptr] * 3 + [cint] * 2 + [ptr] * 2 + [cint] * 2
                    + [ptr, i64, ptr] + [ptr, i64, i64, i64] * 3 + [ptr] * 6 + [i64, i64])
    bwd.restype = cint
    lib.storm_decode_scratch.argtypes = [i64] * 8
    lib.storm_decode_scratch.restype = i64
    dec = lib.storm_decode_f32
    dec.argtypes = ([i64] * 7 + [ctypes.c_float] * 2 + [i64] + [ptr] * 6 + [cint, ptr, i64, i64, i64, cint, ptr]
                    + [i64] * 3 + [ptr, ctypes.c_float, ptr, ptr, cint, i64, ptr, ptr, cint])
    dec.restype = cint
    for name in ("storm_gelu_tanh_f32", "storm_gelu_tanh_bf16"):
        getattr(lib, name).argtypes = [ptr, ptr, i64]
        getattr(lib, name).restype = None
    for name in ("storm_silu_mul_f32", "storm_silu_mul_bf16"):
        getattr(lib, name).argtypes = [ptr, ptr, ptr, i64]
        getattr(lib, name).restype = None
    for name in ("storm_dwconv_silu_f32", "storm_dwconv_silu_bf16"):
        getattr(lib, name).argtypes = [ptr, i64] + [ptr] * 4 + [i64] * 3 + [cint, i64, i64]
        getattr(lib, name).restype = None
    lib.storm_add_layer_norm_f32.argtypes = [ptr] * 4 + [ctypes.c_float, ptr] + [i64] * 3
    lib.storm_add_layer_norm_f32.restype = None
    lib.storm_rms_norm_f32.argtypes = [ptr, ptr, ctypes.c_float, ptr] + [i64] * 3
    lib.storm_rms_norm_f32.restype = None
    lib.storm_attention.argtypes = [ptr] * 8 + [i64] * 5 + [ctypes.c_float, cint, cint, i64, i64]
    lib.storm_attention.restype = cint
    lib.storm_vit_layers_f32.argtypes = [ptr, i64, ptr] + [i64] * 3 + [ptr] + [i64] * 3
    lib.storm_vit_layers_f32.restype = cint
    lib.storm_linear_f32.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr] + [i64] * 4
    lib.storm_linear_f32.restype = None
    lib.storm_fma_chains.argtypes = [i64]
    lib.storm_fma_chains.restype = ctypes.c_float
    lib.storm_isa = isa.name  # the path, its width, and where the bytes came from (benchmarks print them)
    lib.storm_lanes = lanes
    lib.storm_origin = origin
    return lib


def build(isa: str, lanes: int | None = None) -> ctypes.CDLL:
    """Build (or take from the cache) and load the kernel for path ``isa``, raising on failure.
    ``lanes`` overrides the path's vector width (the tests run the 16-lane logic with AVX2 flags,
    where the compiler splits each vector in two). Loading a path the CPU lacks crashes on first use:
    ``load()`` never does that; this is for the tests."""
    spec = ISAS[isa]
    lanes = spec.lanes if lanes is None else int(lanes)
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    data, origin = _library_bytes(cc, spec, lanes)
    return _bind(_dlopen_bytes(data), spec, lanes, origin)


def load(isa: str | None = None, lanes: int | None = None) -> ctypes.CDLL | None:
    """The library for the scan: ``load_library(isa, lanes)``, or None when ``STORM_VLM_SCAN_KERNEL``
    turns the scan kernel off."""
    return load_library(isa, lanes) if enabled() else None


def load_library(isa: str | None = None, lanes: int | None = None) -> ctypes.CDLL | None:
    """The compiled kernel library for path ``selected_isa(isa)``, built on first use; None when no
    path builds. A path that fails falls back to the next narrower one."""
    name = selected_isa(isa)
    key = (name, lanes or 0)
    try:
        return _libs[key]
    except KeyError:
        pass
    with _lock:
        if key in _libs:
            return _libs[key]
        lib, errors = None, []
        for cand in reversed(_ORDER[: _ORDER.index(name) + 1]):
            try:
                lib = build(cand, lanes if cand == name else None)
                break
            except Exception as exc:  # a missing or broken toolchain must never break the model
                errors.append(f"{cand}: {exc}")
                if "no C compiler" in str(exc):
                    break
        if lib is None:
            _warn_once("storm_vlm: CPU kernels unavailable, using PyTorch for the scan, the decode step, GELU, "
                       "conv, LayerNorm and attention (%s)", errors[-1])  # the narrowest path's cause
        elif errors:
            _warn_once("storm_vlm: CPU kernel path %s did not build, using %s (%s)", name, lib.storm_isa,
                       "; ".join(errors))
        _libs[key] = lib
    return lib


# ----------------------------------------------------------------------------- calls
def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _strides(t: Tensor | None) -> tuple[int, int, int]:
    """(batch, time, channel) element strides of a (b, d, L) tensor."""
    if t is None:
        return 0, 0, 0
    sb, sc, st = t.stride()
    return sb, st, sc


def _step_strides(t: Tensor) -> tuple[int, int]:
    """(batch, step) element strides of per-step B or C (b, L, groups, N); (0, 0) for a constant (d, N)."""
    return (t.stride(0), t.stride(1)) if t.dim() == 4 else (0, 0)


def scan_forward(lib: ctypes.CDLL, u: Tensor, delta: Tensor, z: Tensor | None, A: Tensor, BT: Tensor,
                 CT: Tensor, groups: int, D: Tensor | None, bias: Tensor | None, softplus: bool, reverse: bool,
                 h0: Tensor | None, out: Tensor, states: Tensor | None, chunk: int, last: Tensor | None, c0: int,
                 c1: int, delta_proj: Tensor | None = None) -> None:
    """Scan channels [c0, c1) into ``out`` (and ``states`` / ``last`` when given).

    u, delta, z, out: (b, d, L), any strides, all float32 or all bfloat16 (read and written as such,
    float32 arithmetic) (with ``delta_proj`` (d, R) float32 contiguous, delta is instead the factor
    (b, R, L) of ``delta_proj @ delta``); A: (d, N) contiguous; BT, CT: (b, L, groups, N), each
    step's groups x N values contiguous (any batch and step strides), or (d, N) contiguous when
    constant over time; D, bias: (d,) contiguous; h0: initial state (b, d, N) contiguous or None
    (zeros); states: (L/chunk + 1, b, groups, N, d/groups) contiguous; last: (b, d, N) contiguous."""
    b, d, L = u.shape
    n = A.shape[1]
    rank = 0 if delta_proj is None else delta_proj.shape[1]
    rc = lib.storm_scan_fwd_f32(b, L, d, groups, n, _ptr(u), *_strides(u), _ptr(delta), *_strides(delta),
                                _ptr(delta_proj), rank, _ptr(z), *_strides(z), _ptr(A), _ptr(BT),
                                *_step_strides(BT), _ptr(CT), *_step_strides(CT), int(BT.dim() == 2),
                                int(CT.dim() == 2), _ptr(D), _ptr(bias), int(softplus), int(reverse), _ptr(h0),
                                _ptr(out), *_strides(out), _ptr(states), int(chunk), _ptr(last), c0, c1,
                                int(u.dtype == torch.bfloat16))
    if rc != 0:
        raise MemoryError(f"selective-scan forward kernel: out of memory for channels {c0}..{c1} x d_state {n}")


def mixer_direction(lib: ctypes.CDLL, x: Tensor, z: Tensor, conv_taps: Tensor, conv_bias: Tensor | None,
                    x_proj: Tensor, x_proj_bias: Tensor | None, dt_rank: int, dt_proj: Tensor, A: Tensor, D: Tensor,
                    dt_bias: Tensor, reverse: bool, add_to: Tensor | None = None) -> Tensor:
    """One mixer direction in inference (``storm_mixer_direction_f32``): y (b, L, d) float32 from x, z
    (b, L, d) float32 with contiguous channels; conv_taps (K, d), conv_bias (d); x_proj, x_proj_bias:
    x_proj's weight and bias packed as ``storm_linear_f32`` reads them ((d, ldw), columns dt_rank + 2N);
    dt_proj (d, dt_rank), A (d, N), D, dt_bias (d), all float32 contiguous. ``add_to`` (b, L, d)
    float32 contiguous: y is added into it (the sum rounded once) and it is returned."""
    b, L, d = x.shape
    n = A.shape[1]
    out = x.new_empty(b, L, d) if add_to is None else add_to
    u, xd = x.new_empty(L, d), x.new_empty(L, dt_rank + 2 * n)
    rc = lib.storm_mixer_direction_f32(b, L, d, n, dt_rank, conv_taps.shape[0], _ptr(x), x.stride(0), x.stride(1),
                                       _ptr(conv_taps), _ptr(conv_bias), _ptr(x_proj), x_proj.shape[1],
                                       _ptr(x_proj_bias), _ptr(dt_proj), _ptr(A), _ptr(D), _ptr(dt_bias), _ptr(z),
                                       z.stride(0), z.stride(1), _ptr(out), int(add_to is not None), int(reverse),
                                       _ptr(u), _ptr(xd))
    if rc != 0:
        raise MemoryError(f"mixer direction kernel: out of memory for {d} channels x d_state {n}")
    return out


def scan_backward(lib: ctypes.CDLL, u: Tensor, delta: Tensor, z: Tensor | None, gout: Tensor, A: Tensor,
                  BT: Tensor, CT: Tensor, groups: int, D: Tensor | None, bias: Tensor | None, softplus: bool,
                  reverse: bool, states: Tensor, chunk: int, glast: Tensor | None, gu: Tensor, gdelta: Tensor,
                  gz: Tensor | None, gA: Tensor, gD: Tensor | None, gbias: Tensor | None, gBT: Tensor, gCT: Tensor,
                  gh0: Tensor | None, c0: int, c1: int) -> None:
    """Gradients of channels [c0, c1), from the states the forward saved every ``chunk`` steps.

    u, delta, z, gout and the outputs gu, gdelta, gz: (b, d, L) float32, any strides; states:
    (L/chunk + 1, b, groups, N, d/groups), index 0 the initial state; glast: (b, d, N) contiguous or
    None; A, BT, CT contiguous (as ``scan_forward`` reads them). gA (d, N), gD, gbias (d,) and gBT,
    gCT (shaped like BT, CT) are contiguous and accumulated into: pass zeros (per-step gBT, gCT: one
    pair per concurrent call). gh0: None, or (b, d, N) contiguous receiving the initial state's
    gradient."""
    b, d, L = u.shape
    n = A.shape[1]
    rc = lib.storm_scan_bwd_f32(
        b, L, d, groups, n, _ptr(u), *_strides(u), _ptr(delta), *_strides(delta), _ptr(z), *_strides(z),
        _ptr(gout), *_strides(gout), _ptr(A), _ptr(BT), _ptr(CT), int(BT.dim() == 2), int(CT.dim() == 2), _ptr(D),
        _ptr(bias), int(softplus), int(reverse), _ptr(states), int(chunk), _ptr(glast), _ptr(gu), *_strides(gu),
        _ptr(gdelta), *_strides(gdelta), _ptr(gz), *_strides(gz), _ptr(gA), _ptr(gD), _ptr(gbias), _ptr(gBT),
        _ptr(gCT), _ptr(gh0), c0, c1)
    if rc != 0:
        raise MemoryError(f"selective-scan backward kernel: out of memory for chunk {chunk} x d_state {n}")
