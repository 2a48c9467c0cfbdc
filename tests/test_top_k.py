"""ops.top_k: the C++ XLA:CPU kernel gives lax.top_k's values and indices exactly (ties, NaN, infinities,
signed zeros, rows that see fewer keys than k), under jit, vmap and many rows (its threads); dispatch
chooses it on CPU only; a host without it keeps the reference."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.ops import cpu_kernels, dispatch
from dsv3_jax.ops.top_k import CPU_KERNEL, TOP_K, XLA
from dsv3_jax.runtime import Runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
kernel = jax.jit(TOP_K[CPU_KERNEL], static_argnums=1)
reference = jax.jit(TOP_K[XLA], static_argnums=1)


def assert_same(x, k):
    (v, i), (rv, ri) = kernel(x, k), reference(x, k)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))  # NaN == NaN here


def test_the_kernel_builds_here():
    assert cpu_kernels.available(), "the CPU kernels did not build on this machine (see the warning)"
    assert any(n.startswith("cpu_kernels-") for n in os.listdir(cpu_kernels.cache_dir()))


@pytest.mark.parametrize("shape,k", [((1, 32768), 256), ((3, 8192), 256), ((7, 1000), 256), ((2, 300), 300),
                                     ((4, 5), 1), ((64, 2048), 64), ((2, 3, 4096), 100), ((5000,), 7)])
def test_random_scores_equal_xla(shape, k):
    assert_same(jnp.asarray(np.random.RandomState(sum(shape) + k).randn(*shape), jnp.float32), k)


def test_ties_go_to_the_lower_index():
    rng = np.random.RandomState(0)
    assert_same(jnp.asarray(rng.randint(-3, 3, (16, 4096)), jnp.float32), 256)  # thousands of equal values
    assert_same(jnp.zeros((2, 1024)), 256)  # all equal: the first 256, in order


def test_special_values_rank_as_xla_ranks_them():
    x = np.random.RandomState(1).randn(4, 2048).astype(np.float32)
    x[0, :6] = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0]
    x[1, ::3] = np.inf
    x[2, :] = -0.0
    x[2, 1000:1010] = 0.0
    x[3, 100] = np.nan
    assert_same(jnp.asarray(x), 300)


@pytest.mark.parametrize("visible", [0, 1, 255, 256, 257, 5000])
def test_queries_that_see_fewer_keys_than_k(visible):
    """A causal row: scores up to `visible`, -inf after (the indexer's rows in a prefill)."""
    x = np.random.RandomState(visible).randn(3, 8192).astype(np.float32)
    x[:, visible:] = -np.inf
    assert_same(jnp.asarray(x), 256)


def test_many_rows_over_the_threads_and_vmap():
    x = jnp.asarray(np.random.RandomState(2).randn(4, 256, 4096), jnp.float32)
    assert_same(x, 256)
    (v, i), (rv, ri) = jax.vmap(lambda a: kernel(a, 50))(x), jax.vmap(lambda a: reference(a, 50))(x)
    assert jnp.array_equal(i, ri) and jnp.array_equal(v, rv)
    i1 = jax.jit(jax.vmap(lambda a: TOP_K[CPU_KERNEL](a, 50)[1], in_axes=1, out_axes=1))(x)
    assert jnp.array_equal(i1, ri)


@pytest.mark.parametrize("spec", [P("data"), P(None, "data"), P("data", "model"), P("data", None, None)], ids=str)
def test_under_a_mesh_each_device_ranks_its_own_rows(spec):
    """Sharded rows stay sharded: no all-gather of the scores (XLA would gather them around an opaque call)."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x = jnp.asarray(np.random.RandomState(5).randn(8, 4, 2048), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    fn = jax.jit(lambda a: TOP_K[CPU_KERNEL](a, 64))
    v, i = fn(xs)
    rv, ri = TOP_K[XLA](x, 64)
    assert jnp.array_equal(i, ri) and jnp.array_equal(v, rv)
    assert i.sharding.is_equivalent_to(NamedSharding(mesh, spec), i.ndim)
    hlo = fn.lower(xs).compile().as_text()
    assert "dsv3_top_k_f32" in hlo and "all-gather" not in hlo


def test_gradients_equal_xla():
    x = jnp.asarray(np.random.RandomState(4).randn(3, 1000), jnp.float32)
    loss = lambda f: lambda a: jnp.sum(f(a, 40)[0] * jnp.arange(40.0))
    assert jnp.array_equal(jax.grad(loss(TOP_K[CPU_KERNEL]))(x), jax.grad(loss(TOP_K[XLA]))(x))
    assert jnp.array_equal(jax.jit(jax.grad(loss(TOP_K[CPU_KERNEL])))(x), jax.grad(loss(TOP_K[XLA]))(x))


def test_bad_k_and_other_dtypes():
    with pytest.raises(ValueError, match=r"top_k: k = 9 must be in \[1, 8\]"):
        TOP_K[CPU_KERNEL](jnp.zeros((2, 8)), 9)
    x = jnp.asarray(np.random.RandomState(3).randn(3, 500), jnp.bfloat16)  # the reference's path
    assert_same(x, 20)


def test_dispatch_takes_the_kernel_on_cpu_only():
    assert dispatch.top_k(Runtime()) is TOP_K[CPU_KERNEL]
    assert dispatch.top_k(Runtime(platform="tpu")) is TOP_K[XLA]
    assert dispatch.top_k(Runtime(platform="gpu")) is TOP_K[XLA]


def _availability(env: dict) -> subprocess.CompletedProcess:
    code = ("import logging; logging.basicConfig(); from dsv3_jax.ops import cpu_kernels, dispatch; "
            "from dsv3_jax.runtime import Runtime; "
            "print(cpu_kernels.available(), dispatch.top_k(Runtime()).__name__)")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_without_a_working_compiler_the_reference_runs_and_one_warning_says_why(tmp_path):
    r = _availability({"CXX": "/bin/false", "DSV3_JAX_KERNEL_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "xla_top_k"]
    (warning,) = [line for line in r.stderr.splitlines() if "CPU kernels" in line]
    assert "unavailable (RuntimeError: false exited 1" in warning and warning.endswith("using XLA's ops")
    assert os.listdir(tmp_path) == []  # no half-built library left
    r = _availability({"DSV3_JAX_CPU_KERNELS": "0", "DSV3_JAX_KERNEL_CACHE": str(tmp_path)})
    assert r.stdout.split() == ["False", "xla_top_k"] and "CPU kernels" not in r.stderr


def test_a_cached_library_is_reused_not_rebuilt(tmp_path):
    inodes = []
    for _ in range(2):
        r = _availability({"DSV3_JAX_KERNEL_CACHE": str(tmp_path)})
        assert r.stdout.split() == ["True", "cpu_kernel_top_k"], r.stderr[-2000:]
        (built,) = os.listdir(tmp_path)
        inodes.append(os.stat(tmp_path / built).st_ino)
    assert inodes[0] == inodes[1]  # the second process loaded the first one's library, not a rebuild
