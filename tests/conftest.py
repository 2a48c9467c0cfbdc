import gc
import os

import pytest

# Tests run on CPU, with 8 fake devices for the parallelism tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the whole session, inherited by the training subprocesses:
# the training tests compile the same tiny train step many times over (every run, resume and
# process), and CI must stay well under its time limit. A fresh directory per session, so that
# nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsv3_jax_test_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# The C++ CPU kernels (dsv3_jax.ops.cpu_kernels) build once per session into a fresh directory, not the
# user's cache.
if "DSV3_JAX_KERNEL_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["DSV3_JAX_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="dsv3_jax_test_kernels_")
    atexit.register(shutil.rmtree, os.environ["DSV3_JAX_KERNEL_CACHE"], ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    """Collect the session's garbage once, then freeze what is left. pytest collects garbage five more
    times at exit (to report unraisable exceptions); with the ~1M objects a worker holds after its half
    of the suite, each collect takes ~0.5 s, and a pytest-xdist worker that is not done 5 s after the
    run ends is sent SIGINT by execnet (a KeyboardInterrupt warning at the end of the run). Here, in
    a worker, this runs before the worker reports that it has finished."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small Python-like corpus of four shuffled files, for training tests (test files may shadow it)."""
    d = tmp_path_factory.mktemp("corpus")
    text = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(400))
    for k in range(4):
        (d / f"part{k}.py").write_text(text[k * 1000:] + text[: k * 1000])
    return str(d)
