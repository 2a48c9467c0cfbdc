"""Host kernels in C++ for XLA:CPU, called through XLA's FFI (`jax.ffi`): built on first use.

XLA:CPU lowers a few operations to slow generic code (its TopK partial-sorts an index array per row through
an indirect comparator, one row after another); the kernels here replace them where `ops.dispatch` says so,
each beside its reference in a `Registry` and tested equal to it. The sources ship with the package. The
first use compiles them with the host's C++ compiler (`$CXX`, else g++, clang++ or c++) against the FFI
headers of the installed jaxlib (~3 s) into a shared library cached under `$DSV3_JAX_KERNEL_CACHE` (default
`~/.cache/dsv3_jax`), named by a hash of the sources, flags, compiler, jaxlib and machine, so a change to any
of them builds anew and nothing is ever overwritten in place. Without a compiler, or if the build fails,
`available()` is False (one warning says why) and dispatch keeps the XLA reference; `DSV3_JAX_CPU_KERNELS=0`
turns them off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib

SOURCES = ("top_k.cc",)
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# FFI targets: the name jax.ffi.ffi_call uses -> the symbol the library defines (XLA_FFI_DEFINE_HANDLER_SYMBOL).
TARGETS = {"dsv3_top_k_f32": "Dsv3TopKF32"}
BUILD_TIMEOUT_S = 300

log = logging.getLogger(__name__)


def cache_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsv3_jax")
    return os.environ.get("DSV3_JAX_KERNEL_CACHE") or default


def _compiler() -> str | None:
    return os.environ.get("CXX") or next(filter(None, map(shutil.which, ("g++", "clang++", "c++"))), None)


def _sources() -> list[str]:
    return [os.path.join(os.path.dirname(__file__), name) for name in SOURCES]


def _digest(compiler: str) -> str:
    h = hashlib.sha256()
    for path in _sources():
        with open(path, "rb") as f:
            h.update(f.read())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    for part in (*FLAGS, compiler, version, jaxlib.__version__, platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _build(compiler: str, target: str) -> None:
    """Compile into a temporary file beside `target`, then rename it there: a reader sees no half-written
    library, and two processes building at once both end with a whole one."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), *_sources(), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
            raise RuntimeError(f"{os.path.basename(compiler)} exited {done.returncode}: "
                               f"{(errors or ['no output'])[0].strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library with its FFI targets registered for the CPU platform; None where it cannot be
    had (the one warning says why)."""
    if os.environ.get("DSV3_JAX_CPU_KERNELS", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("dsv3_jax CPU kernels: no C++ compiler found ($CXX, g++, clang++, c++); using XLA's ops")
        return None
    try:
        target = os.path.join(cache_dir(), f"cpu_kernels-{_digest(compiler)}.so")
        if not os.path.exists(target):
            _build(compiler, target)
        lib = ctypes.cdll.LoadLibrary(target)
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        log.warning("dsv3_jax CPU kernels unavailable (%s: %s); using XLA's ops", type(e).__name__, e)
        return None
    return lib


def available() -> bool:
    return library() is not None
