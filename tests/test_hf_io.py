"""Checkpoint import/export: round trips, FP8 blocks, shards, the MTP layer and clear errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.hf import layout, load_hf_checkpoint, save_hf_checkpoint
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.safetensors_io import SafetensorsDir


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.from_json("tiny")
    variables = init_variables(cfg, jax.random.PRNGKey(0))
    # A non-zero router bias, so that its round trip is visible.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 * jnp.arange(x.size).reshape(x.shape) if "bias" in str(p) else x, variables)
    return cfg, variables


def _equal(a, b) -> bool:
    same_tree = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return same_tree and all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                   jax.tree_util.tree_leaves(b)))


def test_round_trip_with_mtp(tiny, tmp_path):
    cfg, variables = tiny
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ckpt"))
    cfg2, variables2 = load_hf_checkpoint(str(tmp_path / "ckpt"))
    assert cfg2.mtp_depth == 1 and "mtp_0" in variables2["params"]
    assert cfg2 == cfg  # the name (a label) aside, the file holds the whole config
    assert _equal(variables, variables2)
    files = SafetensorsDir(str(tmp_path / "ckpt"))
    mtp = f"model.layers.{cfg.num_layers}"
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "mlp.experts.0.gate_proj.weight"):
        assert f"{mtp}.{name}" in files


def test_sharded_round_trip(tiny, tmp_path):
    cfg, variables = tiny
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ckpt"), max_shard_bytes=100_000)
    index = json.load(open(tmp_path / "ckpt" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    _, variables2 = load_hf_checkpoint(str(tmp_path / "ckpt"))
    assert _equal(variables, variables2)


def test_bfloat16_save(tiny, tmp_path):
    cfg, variables = tiny
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ckpt"), weights="bfloat16")
    _, variables2 = load_hf_checkpoint(str(tmp_path / "ckpt"), dtype=jnp.bfloat16)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(variables2)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(b, np.float32), a, rtol=1e-2, atol=1e-6)


def test_fp8_weights_and_scales(tiny, tmp_path):
    """FP8 linear weights with 128x128 scales (edge blocks: every tiny dim is < 128) load close."""
    cfg, variables = tiny
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ckpt"), weights="fp8")
    files = SafetensorsDir(str(tmp_path / "ckpt"))
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert files.get(name).dtype.name == "float8_e4m3fn"
    assert files.shape(name.replace("weight", "weight_scale_inv")) == (1, 1)
    assert files.get("model.embed_tokens.weight").dtype == np.float32  # embedding stays high precision
    cfg2, variables2 = load_hf_checkpoint(str(tmp_path / "ckpt"))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16)), jnp.int32)
    ref = Transformer(cfg).apply(variables, tokens)
    got = Transformer(cfg2).apply(variables2, tokens)
    assert float(jnp.abs(got - ref).max() / jnp.abs(ref).max()) < 0.05
    w, w2 = variables["params"]["layers_0"]["attn"]["wq_a"], variables2["params"]["layers_0"]["attn"]["wq_a"]
    assert not np.array_equal(w, w2)  # really quantised...
    np.testing.assert_allclose(w2, w, atol=float(jnp.abs(w).max()) / 8)  # ...to E4M3's 3-bit mantissa


def test_memory_mapped_reads(tiny, tmp_path):
    cfg, variables = tiny
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ckpt"))
    x = SafetensorsDir(str(tmp_path / "ckpt")).get("model.embed_tokens.weight")
    assert isinstance(x.base, np.memmap) or isinstance(x, np.memmap)  # a view, not a copy
    assert not x.flags.writeable


def _rewrite(src, dst, edit):
    """Copy a single-file checkpoint through `edit(dict of tensors)`."""
    from safetensors.numpy import save_file

    files = SafetensorsDir(src)
    tensors = {n: np.array(files.get(n)) for n in files.names()}
    edit(tensors)
    os.makedirs(dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


def test_missing_tensor_is_named(tiny, tmp_path):
    cfg, variables = tiny
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ok"))
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite(str(tmp_path / "ok"), str(tmp_path / "bad"), lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor {name}"):
        load_hf_checkpoint(str(tmp_path / "bad"))


def test_misshaped_tensor_names_both_shapes(tiny, tmp_path):
    cfg, variables = tiny
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ok"))
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(str(tmp_path / "ok"), str(tmp_path / "bad"), lambda t: t.update({name: t[name][:, :-1].copy()}))
    with pytest.raises(ValueError, match=r"up_proj.weight has shape \(128, 63\), expected \(128, 64\)"):
        load_hf_checkpoint(str(tmp_path / "bad"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_checkpoint(str(tmp_path))


def test_save_refuses_to_clobber(tiny, tmp_path):
    cfg, variables = tiny
    target = tmp_path / "ckpt"
    save_hf_checkpoint(cfg, variables, str(target))
    before = sorted(os.listdir(target))
    with pytest.raises(FileExistsError):
        save_hf_checkpoint(cfg, variables, str(target))
    assert sorted(os.listdir(target)) == before
    save_hf_checkpoint(cfg, variables, str(target), overwrite=True)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".hf-")] == []


def test_layout_covers_every_variable(tiny):
    cfg, variables = tiny
    covered = {e.path for e in layout(cfg)}
    for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
        assert tuple(k.key for k in path) in covered


def test_transformers_reads_our_export(tiny, tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import DeepseekV3ForCausalLM

    cfg, variables = tiny
    save_hf_checkpoint(cfg, variables, str(tmp_path / "ckpt"))
    model = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "ckpt")).eval()
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens)).logits.numpy()
    ours = Transformer(cfg).apply(variables, jnp.asarray(tokens, jnp.int32))
    assert float(np.abs(ours - ref).max() / np.abs(ref).max()) < 1e-4
