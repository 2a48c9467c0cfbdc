"""hlo_comms: the collectives of a compiled program and the bytes they send, loops' trip counts included.

Spellings of the compilers' HLO text are checked on snippets; the counting on programs compiled for a
`v5e:2x2` topology (libtpu, compile-only) and
for 4 H100s (where the CUDA build is installed), where a scanned loop of all-gathers must send what the same
gathers unrolled send, and both what the shapes say.
"""
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax import gpu_targets, hlo_comms, plan

# Two while loops over one body (6 iterations read from the condition, 3 stated), an async all-reduce,
# an async reduce-scatter over mesh axes on a transposed iota, a permute.
GATHER_IN_LOOP = (Path(__file__).parent / "data" / "loop_collectives.hlo").read_text()


def test_snippet_counts_loops_and_async_forms():
    found, unknown = hlo_comms.collectives(GATHER_IN_LOOP, 4)
    assert unknown == 0
    by_kind = {}
    for c in found:
        by_kind.setdefault(c.kind, []).append(c)
    # The body is entered by two loops: 6 iterations (from the condition) + 3 (stated) = 9 runs.
    (gather,) = by_kind["all-gather"]
    assert gather.runs == 9 and gather.group_size == 4 and gather.output_bytes == 32 * 128 * 2
    assert gather.sent_bytes == 32 * 128 * 2 * 3 / 4
    (reduce,) = by_kind["all-reduce"]  # the -done half is not counted
    assert reduce.runs == 9 and reduce.groups == ((0, 1), (2, 3)) and reduce.sent_bytes == 2 * 256 * 4 / 2
    # An async reduce-scatter's outputs are the second half of its result; mesh axes over a transposed iota.
    (scatter,) = by_kind["reduce-scatter"]
    assert scatter.output_bytes == 16 * 128 * 2 + 8 * 4 and scatter.groups == ((0, 2), (1, 3))
    assert scatter.sent_bytes == scatter.output_bytes * 1
    (permute,) = by_kind["collective-permute"]
    assert permute.output_bytes == 4 * 4 * 2 and permute.runs == 1 and permute.sent_bytes == 32
    total = hlo_comms.communication(found, hlo_comms.Links(1e9, 1e8, 2))
    expected = gather.sent_bytes * 9 + reduce.sent_bytes * 9 + scatter.sent_bytes + permute.sent_bytes
    assert total["bytes"] == pytest.approx(expected)
    # Groups {0,1} and {2,3} stay inside 2-device nodes; {0,1,2,3} and (0,2) do not.
    assert total["network_bytes"] == pytest.approx(gather.sent_bytes * 9 + scatter.sent_bytes)
    assert total["seconds"] == pytest.approx((reduce.sent_bytes * 9 + permute.sent_bytes) / 1e9
                                             + (gather.sent_bytes * 9 + scatter.sent_bytes) / 1e8)


@pytest.mark.parametrize("line, groups", [
    ("replica_groups={{0,1},{2,3}}, dimensions={0}", ((0, 1), (2, 3))),
    ("replica_groups=[2,2]<=[4], dimensions={0}", ((0, 1), (2, 3))),
    ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", ((0, 2), (1, 3))),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, dimensions={0}", ((0, 2), (1, 3))),
    ("replica_groups=mesh['axis_0'=4] {'axis_0'}, use_global_device_ids=true", ((0, 1, 2, 3),)),
    ("replica_groups={}, dimensions={0}", ((0, 1, 2, 3),)),
])
def test_replica_group_spellings(line, groups):
    assert hlo_comms.replica_groups(line, 4) == groups


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compile-only TPU programs need libtpu: pip install 'jax[tpu]==0.10.2'")
needs_cuda = pytest.mark.skipif(not gpu_targets.cuda_installed(),
                                reason="compile-only GPU programs need: pip install 'jax[cuda12]==0.10.2'")


@pytest.fixture(scope="module", params=[pytest.param("v5e:2x2", marks=needs_libtpu),
                                        pytest.param("h100:4", marks=needs_cuda)])
def mesh(request):
    devices = plan.topology_devices(request.param)
    return jax.sharding.Mesh(np.array(devices), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))


LAYERS, D = 5, 512


def _compiled(mesh, scanned: bool):
    """A stack of LAYERS weights, each sharded over 4 devices and gathered whole to be used (FSDP)."""
    whole = NamedSharding(mesh, P())

    def f(x, ws):
        def layer(h, w):
            w = jax.lax.with_sharding_constraint(w, whole)
            return jnp.tanh(h @ w), None
        if scanned:
            return jax.lax.scan(layer, x, ws)[0]
        for i in range(LAYERS):
            x = layer(x, ws[i])[0]
        return x

    x = jax.ShapeDtypeStruct((8, D), jnp.bfloat16, sharding=whole)
    ws = jax.ShapeDtypeStruct((LAYERS, D, D), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp")))
    return jax.jit(f).lower(x, ws).compile()


def test_scanned_gathers_send_what_unrolled_ones_do(mesh):
    sent = {}
    for scanned in (True, False):
        found, unknown = hlo_comms.collectives(_compiled(mesh, scanned).as_text(), 4)
        assert unknown == 0
        sent[scanned] = hlo_comms.communication(found, hlo_comms.Links(1e9, 0, 4))["by_kind"]
    # Each weight (D x D bf16) is gathered once: a device receives, and in a ring sends, 3/4 of it.
    expected = LAYERS * D * D * 2 * 3 / 4
    assert sent[True]["all-gather"] == pytest.approx(expected)
    assert sent[False]["all-gather"] == pytest.approx(expected)
