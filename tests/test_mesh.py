"""Mesh parsing and the logical-axis rules table: errors, collisions, shardings of named weights."""
import jax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import logical_axes, variable_shapes
from dsv3_jax.parallel.distributed import cluster_detected, maybe_initialize
from dsv3_jax.parallel.mesh import MESH_AXES, make_mesh, parse_mesh
from dsv3_jax.parallel.rules import RULES, batch_sharding, batch_shards, param_shardings, spread, to_mesh_spec


def test_parse_mesh_fills_every_axis():
    assert parse_mesh("data=2,expert=4", 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert parse_mesh(" tensor = 2 , fsdp=4 ", 8) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    assert parse_mesh("", 8) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}


@pytest.mark.parametrize("spec,message", [
    ("data=2,pipeline=4", "unknown axis 'pipeline'"),
    ("data:8", "cannot read 'data:8'"),
    ("data=2,,expert=4", "cannot read ''"),
    ("data=two", "cannot read 'data=two'"),
    ("data=0,expert=8", "size 0"),
    ("data=-2,expert=-4", "size -2"),
    ("data=2,data=4", "given twice"),
    ("data=2,expert=2", "multiply to 4, but there are 8 devices"),
])
def test_parse_mesh_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(spec, 8)


def test_make_mesh_has_all_axes_in_order_and_auto():
    mesh = make_mesh({"expert": 4, "data": 2})
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert set(mesh.axis_types) == {AxisType.Auto}
    assert make_mesh({"data": 2}, jax.devices()[:2]).devices.size == 2
    with pytest.raises(ValueError, match="needs 4 devices, got 8"):
        make_mesh({"data": 4})
    with pytest.raises(ValueError, match="unknown axes"):
        make_mesh({"pipeline": 8})


@pytest.fixture(scope="module")
def meshes():
    return {spec: make_mesh(parse_mesh(spec, 8)) for spec in ("data=8", "data=2,expert=4", "fsdp=2,expert=2,tensor=2")}


def test_size_one_axes_are_dropped(meshes):
    mesh = meshes["data=2,expert=4"]
    assert to_mesh_spec(P("batch", "seq", "act_embed"), mesh) == P(("data", "expert"), None, None)
    assert to_mesh_spec(P("expert", "embed", "mlp"), mesh) == P("expert", None, None)
    # embed (fsdp) beside batch (data, fsdp, expert) is no collision where fsdp has size 1
    assert to_mesh_spec(P("batch", "seq", "embed"), mesh) == P(("data", "expert"), None, None)
    assert to_mesh_spec(P("batch"), meshes["data=8"]) == P("data")


def test_collision_is_an_error_naming_both_axes(meshes):
    """Two logical axes that map to one mesh axis in one spec: the table must say which is split."""
    mesh = meshes["fsdp=2,expert=2,tensor=2"]
    assert to_mesh_spec(P("batch", "seq", "act_embed"), mesh) == P(("fsdp", "expert"), None, None)
    for spec, a, b, axis in [(P("batch", "seq", "embed"), "batch", "embed", "fsdp"),
                             (P("embed", "batch"), "embed", "batch", "fsdp"),
                             (P("heads", "mlp"), "heads", "mlp", "tensor")]:
        with pytest.raises(ValueError, match=f"'{a}' and '{b}' both map to mesh axis '{axis}'"):
            to_mesh_spec(spec, mesh)
    # The same logical axis twice shards only its first dimension (one name, no ambiguity).
    assert to_mesh_spec(P("embed", "embed"), mesh) == P("fsdp", None)


def test_dimensions_that_do_not_divide_are_replicated(meshes):
    mesh = meshes["fsdp=2,expert=2,tensor=2"]
    assert to_mesh_spec(P("expert", "embed", "mlp"), mesh, (4, 64, 32)) == P("expert", "fsdp", "tensor")
    assert to_mesh_spec(P("expert", "embed", "mlp"), mesh, (3, 64, 5)) == P(None, "fsdp", None)
    assert to_mesh_spec(P("batch"), mesh, (6,)) == P("fsdp")  # 2 divides 6, 2 * 2 does not


def test_unknown_logical_name_is_an_error(meshes):
    with pytest.raises(ValueError, match="'embd' has no sharding rule"):
        to_mesh_spec(P("embd"), meshes["data=8"])


def test_every_logical_name_of_the_model_has_a_rule():
    for preset in ("tiny", "deepseek_v2_lite_16b"):  # with and without the query latent
        specs = jax.tree_util.tree_leaves(logical_axes(ModelConfig.from_json(preset)),
                                          is_leaf=lambda x: isinstance(x, P))
        names = {n for spec in specs for n in spec if n is not None}
        assert names <= set(RULES), names - set(RULES)


def test_named_parameter_shardings(meshes):
    cfg = ModelConfig.from_json("tiny")
    sh = param_shardings(logical_axes(cfg), variable_shapes(cfg), meshes["fsdp=2,expert=2,tensor=2"])
    p = sh["params"]
    assert isinstance(p["embed"], NamedSharding)
    # [vocab, embed]: the logical axes give tensor and fsdp, ZeRO-3 adds the unused expert axis
    assert p["embed"].spec == P(("tensor", "expert"), "fsdp")
    assert p["lm_head"].spec == P("fsdp", ("tensor", "expert"))  # [embed, vocab]
    assert p["layers_1"]["ffn"]["w1"].spec == P("expert", "fsdp", "tensor")
    assert p["layers_1"]["ffn"]["w2"].spec == P("expert", "tensor", "fsdp")
    assert p["layers_1"]["ffn"]["router"].spec == P("fsdp", "expert")
    assert p["layers_0"]["attn"]["wkv_b"].spec == P("fsdp", "tensor", "expert")  # [kv_lora, heads, kv_dim]
    assert sh["router"]["layers_1"]["ffn"]["bias"].spec == P()
    ep = param_shardings(logical_axes(cfg), variable_shapes(cfg), meshes["data=2,expert=4"])["params"]
    assert ep["layers_1"]["ffn"]["w1"].spec == P("expert", None, None)
    assert ep["mtp_0"]["block"]["ffn"]["w3"].spec == P("expert", None, None)
    assert ep["embed"].spec == P("expert", None)  # data parallel copies; the expert axis splits it


def test_batch_sharding_spans_data_fsdp_and_expert(meshes):
    mesh = meshes["fsdp=2,expert=2,tensor=2"]
    assert batch_sharding(mesh).spec == P(("fsdp", "expert"))
    assert batch_shards(mesh) == 4
    assert batch_shards(meshes["data=2,expert=4"]) == 8


# -- multi-process start-up (what can be checked without starting one) ---------------------------

_CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri",
                 "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def no_cluster(monkeypatch):
    for var in _CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_single_process_initializes_nothing(no_cluster):
    assert cluster_detected() is None
    assert maybe_initialize() is False
    assert maybe_initialize("", None, None) is False


@pytest.mark.parametrize("args,message", [
    (("127.0.0.1:1234", None, 0), "needs all of --coordinator_address, --num_processes and --process_id"),
    ((None, 2, 0), "needs all of"),
    (("127.0.0.1:1234", 2, 2), "need 0 <= process_id < num_processes"),
])
def test_incomplete_multi_process_flags(no_cluster, args, message):
    with pytest.raises(ValueError, match=message):
        maybe_initialize(*args)


def test_cluster_detection(no_cluster):
    no_cluster.setenv("SLURM_JOB_ID", "7")  # a plain salloc shell: not a multi-process launch
    assert cluster_detected() is None
    no_cluster.setenv("SLURM_PROCID", "0")
    no_cluster.setenv("SLURM_NTASKS", "4")
    assert cluster_detected() == "slurm"
    no_cluster.delenv("SLURM_JOB_ID")
    no_cluster.setenv("TPU_WORKER_HOSTNAMES", "host-a")
    assert cluster_detected() is None  # one TPU host
    no_cluster.setenv("TPU_WORKER_HOSTNAMES", "host-a,host-b")
    assert cluster_detected() == "cloud-tpu"
    no_cluster.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert cluster_detected() == "JAX_COORDINATOR_ADDRESS"


def test_weights_are_spread_over_the_zero3_axes():
    """A weight whose logical axes leave fsdp or expert unused takes them on its largest divisible
    dimension; vectors, and dimensions the axes do not divide, stay as they were."""
    mesh = make_mesh(parse_mesh("fsdp=2,expert=4", 8))
    assert spread(P(None, None, None), (512, 128, 192), mesh) == P(("fsdp", "expert"), None, None)
    assert spread(P(None, "fsdp"), (2048, 7168), mesh) == P(None, ("fsdp", "expert"))  # 3584 > 2048 a shard
    assert spread(P(None, "fsdp"), (8192, 7168), mesh) == P("expert", "fsdp")
    assert spread(P("expert", "fsdp", None), (8, 64, 32), mesh) == P("expert", "fsdp", None)
    assert spread(P(None), (7168,), mesh) == P(None) and spread(P(), (7168,), mesh) == P()
    assert spread(P(None, None), (3, 5), mesh) == P(None, None)
