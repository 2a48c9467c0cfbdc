import os

import pytest

# Tests run on CPU, with 8 fake devices for the parallelism tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small Python-like corpus of four shuffled files, for training tests (test files may shadow it)."""
    d = tmp_path_factory.mktemp("corpus")
    text = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(400))
    for k in range(4):
        (d / f"part{k}.py").write_text(text[k * 1000:] + text[: k * 1000])
    return str(d)
