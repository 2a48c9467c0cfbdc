"""Compile-only TPU plans (`python -m dsv3_jax.plan`): the real train and decode steps compiled for `v5e:2x2`
(4 chips) by libtpu on this CPU host, the train step's memory against a count made here, refusals through the
real CLI."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

pytest.importorskip("libtpu", reason="compile-only TPU plans need libtpu: pip install 'jax[tpu]==0.10.2'")

from dsv3_jax import plan  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.parallel.mesh import make_mesh  # noqa: E402
from dsv3_jax.runtime import Runtime  # noqa: E402
from dsv3_jax.train.step import OptimConfig, init_state, state_shardings  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = "v5e:2x2"
MESH = {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
# One sequence per chip, short: the train state, not the activations, is what the count below covers.
BATCH, SEQ = 4, 32
REQUIRED_KEYS = {"target", "devices", "mesh", "per_device_bytes", "hbm_bytes", "fits", "compile_s",
                 "compiled_flops_per_device", "model_flops_per_device", "estimated_step_s", "estimated_mfu"}


@pytest.fixture(scope="module")
def devices():
    return plan.topology_devices(TARGET)


def _setup(name: str, **runtime) -> plan.Setup:
    return plan.Setup(ModelConfig.from_json(name), TARGET, MESH, BATCH, SEQ,
                      Runtime(dtype="bfloat16", platform="tpu", **runtime), OptimConfig())


@pytest.fixture(scope="module")
def reports(devices):
    return {name: plan.plan(_setup(name), devices) for name in ("tiny", "small")}


def tpu_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of one array in TPU HBM. TPU memory is tiled: the compiler picks two dimensions as the tiled
    minor pair; the minor one is rounded up to 128 elements, the other up to 8 (below 8, up to a power of
    two). We take the cheapest pair, as the compiler is free to. A scalar takes a 128-element tile, a
    vector rounds up to 128."""
    up = lambda v, m: -(-v // m) * m
    if len(shape) < 2:
        return up(shape[0] if shape else 1, 128) * itemsize
    best = math.inf
    for minor, second in itertools.permutations(range(len(shape)), 2):
        rest = math.prod(shape) // (shape[minor] * shape[second])
        tile = 8 if shape[second] >= 8 else 1 << (shape[second] - 1).bit_length()
        best = min(best, rest * up(shape[minor], 128) * up(shape[second], tile))
    return best * itemsize


def independent_count(name: str, devices) -> dict[str, int]:
    """Per-device bytes from the shapes and shardings alone, no compiler figure used:
    - state: the f32 parameters and AdamW's two moments (each sharded like its parameter) and the scalar
      counters, each shard as `tpu_bytes` lays it out, plus the batch shard (int32 token windows);
    - gradients: one more f32 copy of the parameter shards;
    - gathered weights: with FSDP every device computes with each weight whole, in bf16, and the
      compiler keeps those copies from the forward to the backward (measured: it does not gather twice),
      so one bf16 copy of every unsharded weight."""
    cfg, optim = ModelConfig.from_json(name), OptimConfig()
    mesh = make_mesh(MESH, devices=devices)
    shardings = state_shardings(cfg, optim, mesh)
    abstract = jax.eval_shape(lambda: init_state(cfg, optim, 0))
    shard = lambda a, s: tpu_bytes(s.shard_shape(a.shape), a.dtype.itemsize)
    sizes = jax.tree_util.tree_map(shard, abstract, shardings)
    params = sum(jax.tree_util.tree_leaves(sizes.params))
    rows, cols = BATCH // 4, SEQ + 1 + cfg.mtp_depth  # the batch splits over the 4 fsdp devices
    state = sum(jax.tree_util.tree_leaves(sizes)) + tpu_bytes((rows, cols), 4)
    gathered = sum(math.prod(p.shape) * 2 for p in jax.tree_util.tree_leaves(abstract.params))
    return {"state": state, "gradients": params, "gathered_weights": gathered}


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_preset_fits_and_arguments_match_count(reports, devices, name):
    r = reports[name]
    assert REQUIRED_KEYS <= set(r) and json.loads(json.dumps(r))["target"] == TARGET
    assert r["fits"] and r["devices"] == 4 and r["compile_s"] > 0
    b = r["per_device_bytes"]
    assert b["total"] == b["arguments"] + b["temporaries"] + b["outputs"] - b["alias"] <= r["hbm_bytes"]
    # The state is donated: the new state is written over the old, so outputs are (almost) all alias.
    assert b["alias"] >= 0.99 * b["outputs"]
    count = independent_count(name, devices)
    assert b["arguments"] == pytest.approx(count["state"], rel=0.25)


def test_small_total_matches_count(reports, devices):
    """The whole step's memory: state + gradients + the gathered bf16 weights, at a batch too small for
    activations to matter. (Not for `tiny`: its ~10-20 MiB of compiler temporaries do not scale with the
    model or the batch and dwarf its 2 MiB of state; docs/SCALE.md.)"""
    count = independent_count("small", devices)
    assert reports["small"]["per_device_bytes"]["total"] == pytest.approx(sum(count.values()), rel=0.25)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_flops_and_estimate(reports, name):
    r = reports[name]
    # The compiler's count holds the cost model's and more (MTP, the masked attention half, the experts'
    # dense weight gradients): never less without a loop in the step.
    assert r["compiled_flops_per_device"] > r["model_flops_per_device"] > 0
    assert r["flops_note"].startswith("compiled / model = ")
    assert 0 < r["estimated_mfu"] <= 1 and r["estimated_step_s"] >= r["compute_s"] > 0
    assert r["estimated_step_s"] >= r["communication_s"] > 0 and r["loops_without_trip_count"] == 0


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_communication_covers_the_fsdp_gathers(reports, devices, name):
    """With every weight sharded 4 ways, each is gathered whole (bf16) at least once a step, 3/4 of it
    through each device's links, and the gradients are reduced at least once (bf16 or wider)."""
    r, count = reports[name], independent_count(name, devices)
    gathers = 0.75 * count["gathered_weights"]
    assert r["communication_by_kind"]["all-gather"] >= gathers
    assert r["communication_bytes_per_device"] >= 2 * gathers
    chip = plan.CHIPS["v5e"]
    assert r["communication_s"] == pytest.approx(r["communication_bytes_per_device"] / (chip.link_bandwidth / 2))


def test_remat_passes_through(reports, devices):
    """`full` remat recomputes each block's forward in the backward: more compiled FLOPs, the same model's."""
    r = plan.plan(_setup("tiny", remat="full"), devices)
    assert r["remat"] == "full" and r["fits"]
    assert r["compiled_flops_per_device"] > reports["tiny"]["compiled_flops_per_device"]
    assert r["model_flops_per_device"] == reports["tiny"]["model_flops_per_device"]


DECODE_KEYS = REQUIRED_KEYS | {"mode", "context", "weights", "estimated_tokens_per_s"}


def _decode_setup(name: str, weights: str = "bf16", speculative: str = "none", context: int = 256) -> plan.Setup:
    return dataclasses.replace(_setup(name), mode="decode", context=context, weights=weights,
                               speculative=speculative)


@pytest.fixture(scope="module")
def decode_reports(devices):
    return {w: plan.plan(_decode_setup("tiny", w), devices) for w in ("bf16", "fp8")}


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_decode_compiles_and_fits(decode_reports, weights):
    r = decode_reports[weights]
    assert DECODE_KEYS <= set(r) and json.loads(json.dumps(r))["mode"] == "decode"
    assert r["fits"] and r["weights"] == weights and r["context"] == 256 and r["compile_s"] > 0
    b = r["per_device_bytes"]
    assert b["total"] == b["arguments"] + b["temporaries"] + b["outputs"] - b["alias"] <= r["hbm_bytes"]
    # The state (the caches above all) is donated: the new one is written over the old.
    assert b["alias"] >= 0.9 * b["outputs"] > 0
    assert r["compiled_flops_per_device"] > 0 and r["model_flops_per_device"] > 0
    # The estimate is memory-bound (bytes accessed at the bandwidth) or communication-bound; one token
    # a row a step.
    chip = plan.CHIPS["v5e"]
    assert r["hbm_s"] == pytest.approx(r["compiled_bytes_accessed_per_device"] / chip.hbm_bandwidth)
    assert r["estimated_step_s"] == max(r["hbm_s"], r["communication_s"])
    assert r["estimated_tokens_per_s"] == pytest.approx(BATCH / 4 / r["estimated_step_s"])


def test_decode_fp8_weights_take_less(decode_reports):
    arguments = {w: r["per_device_bytes"]["arguments"] for w, r in decode_reports.items()}
    assert arguments["fp8"] < arguments["bf16"]


def test_decode_state_is_sharded(devices):
    """The caches' rows split over the batch shards; the fp8 block scales and absorbed halves replicated."""
    setup = _decode_setup("tiny", "fp8")
    mesh = make_mesh(MESH, devices=devices)
    variables = plan.abstract_decode_variables(setup, mesh)
    fp8 = [x for x in jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, plan.Fp8Weight))
           if isinstance(x, plan.Fp8Weight)]
    assert fp8 and all(w.scale.sharding.is_fully_replicated for w in fp8)
    assert all(a.sharding.is_fully_replicated for a in jax.tree_util.tree_leaves(variables[plan.ABSORBED]))
    state = plan.abstract_decode_state(setup, plan.decode_generator(setup), variables, mesh)
    slots = plan.cache_slots(setup, 0)
    assert slots % 64 == 0 and slots > setup.context
    for cache in state.cache:
        assert cache.slots == slots and cache.rows.shape[0] == BATCH * slots
        assert cache.rows.sharding.shard_shape(cache.rows.shape)[0] == BATCH * slots // 4
    assert state.length.sharding.is_fully_replicated


def test_tpu_decode_keeps_the_caches_row_major(devices):
    """TPU lays a [B*S, 576] cache out with B*S minor by default; the engine's step pins the caches' rows
    row-major at its entry and exit (`Generator.step_for`), so the compiled step copies no cache: the decode
    kernel and the loop read rows as stored. Latent 512 + rope 64, as V3's."""
    cfg = ModelConfig.from_json("tiny").replace(kv_lora_rank=512, qk_rope_head_dim=64, num_heads=16,
                                                qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=2048)
    setup = dataclasses.replace(_decode_setup("tiny", context=1024), cfg=cfg)
    compiled, _ = plan.compile_decode(setup, devices)
    rows = [c.rows for c in compiled.input_formats[0][1].cache]
    assert rows and all(f.layout.major_to_minor == (0, 1) for f in rows)
    slots = plan.cache_slots(setup, 0)
    column_major = f"[{BATCH * slots // 4},576]{{0,1"  # one device's rows, laid out rows minor
    assert not [line for line in compiled.as_text().splitlines() if column_major in line]


def test_dsa_decode_places_the_indexer_keys_and_compiles(devices):
    """A V3.2 model's caches hold the indexer's keys too: split over the batch shards as the latent rows are,
    and the decode step (indexer scores, top-k, sparse attention over a 512-slot cache) compiles."""
    setup = dataclasses.replace(_decode_setup("tiny", context=512), cfg=ModelConfig.from_json("tiny").replace(
        index_n_heads=4, index_head_dim=32, index_topk=64))
    mesh = make_mesh(MESH, devices=devices)
    variables = plan.abstract_decode_variables(setup, mesh)
    state = plan.abstract_decode_state(setup, plan.decode_generator(setup), variables, mesh)
    for cache in state.cache:
        batch = cache.rows.shape[0] // cache.slots
        assert cache.index_keys.shape == (batch * 32, cache.slots)  # transposed: [B*I, S]
        assert cache.index_keys.sharding.shard_shape(cache.index_keys.shape)[0] == batch * 32 // 4
    r = plan.plan(setup, devices)
    assert r["fits"] and r["per_device_bytes"]["arguments"] > 0


def test_decode_speculative_mtp_compiles(devices, decode_reports):
    r = plan.plan(_decode_setup("tiny", speculative="mtp"), devices)
    assert r["fits"] and r["speculative"] == "mtp"
    # A window of 1 + D tokens and the MTP chain: more work than plain decoding.
    assert r["compiled_flops_per_device"] > decode_reports["bf16"]["compiled_flops_per_device"]


def test_oom_message_parsed():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(235.17G) exceeds available HBM (15.75G).")
    assert plan.oom_bytes(message) == (round(235.17 * 2**30), round(15.75 * 2**30), "temporaries")
    # libtpu's other wording, when it runs out while placing buffers (the tpu7x decode search at 1,536 rows)
    placing = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory "
               "in memory space hbm. Used 94.98G of 94.75G hbm. Exceeded hbm capacity by 235.18M.")
    assert plan.oom_bytes(placing) == (round(94.98 * 2**30), round(94.75 * 2**30), "total")
    assert plan.oom_bytes("INTERNAL: something else") is None
    report = {"config": "deepseek_v3_671b", "target": "tpu7x:2x2x2", "devices": 16, "mode": "decode", "batch": 2256,
              "seq": 256, "context": 4096, "weights": "fp8"}
    refused = plan._refused(report, RuntimeError(placing))
    assert refused["refused_by_compiler"] and not refused["fits"]
    assert refused["per_device_bytes"]["total"] == round(94.98 * 2**30)
    assert refused["per_device_bytes"]["temporaries"] is None
    assert "ran out of HBM placing its buffers, 94.98 GiB per device placed, 94.75 GiB of HBM" in plan.refusal_line(
        refused)


def test_bad_inputs_are_plan_errors(devices, monkeypatch):
    with pytest.raises(plan.PlanError, match="libtpu cannot make this topology"):
        plan.topology_devices("v5e:3x3")
    with pytest.raises(plan.PlanError, match="multiple of 4"):
        plan.compile_step(dataclasses.replace(_setup("tiny"), batch=6), devices)
    monkeypatch.setattr(plan.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(plan.PlanError, match="pip install"):
        plan.topology_devices(TARGET)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv3_jax.plan", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_refuses_a_plan_that_does_not_fit():
    # 2M tokens of `small` on four 16 GiB chips: the compiler refuses it (its temporaries alone need ~235 GiB).
    out = _cli("--config", "small", "--target", TARGET, "--batch", "1024", "--seq", "2048")
    assert out.returncode == plan.EXIT_DOES_NOT_FIT, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("does not fit:") and "15.75 GiB of HBM" in lines[0]
    assert "Traceback" not in out.stderr


def test_cli_refuses_a_decode_that_does_not_fit():
    # 32768 rows of 2048-token caches of `small` (~17 GiB of cache per chip): refused for want of HBM.
    out = _cli("--mode", "decode", "--config", "small", "--target", TARGET, "--batch", "32768", "--context", "2048")
    assert out.returncode == plan.EXIT_DOES_NOT_FIT, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("does not fit:") and "context 2048" in lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flags", [["--target", "v9z:2x2"], ["--target", "v5e:3x7"],
                                   ["--target", "v5e:2x2", "--mesh", "fsdp=3"], ["--batch", "two"],
                                   ["--mode", "decode", "--context", "100000"], ["--mode", "decode", "--batch", "6"]])
def test_cli_bad_input_is_one_line_and_exit_2(flags):
    out = _cli("--config", "tiny", *flags)
    assert out.returncode == plan.EXIT_BAD_INPUT
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("python -m dsv3_jax.plan: error: ")


def test_prefill_compiles_and_holds_the_caches(devices):
    """--mode prefill: the engine's prefill of BATCH prompts of SEQ tokens into caches of 256 slots; its
    outputs are the new state, the latent caches above all (at least their bytes per device)."""
    cfg = ModelConfig.from_json("tiny")
    setup = dataclasses.replace(_decode_setup("tiny", context=256), mode="prefill")
    r = plan.plan(setup, devices)
    assert r["fits"] and r["mode"] == "prefill" and r["seq"] == SEQ and r["compile_s"] > 0
    slots = plan.cache_slots(setup, 0)
    caches = BATCH * slots * cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2  # bf16
    assert r["per_device_bytes"]["outputs"] >= caches / 4
    assert r["model_flops_per_device"] == pytest.approx(plan.model_flops_per_device(setup, 4) / 3)
    assert r["estimated_step_s"] > 0 and "prefill" in plan.format_report(r)
    assert plan.refusal_line({**r, "fits": False}).startswith(
        f"does not fit: tiny on v5e:2x2 (4 devices), prefill, {BATCH} prompts x {SEQ} tokens")
    with pytest.raises(plan.PlanError, match="must fit its cache"):
        plan.plan(dataclasses.replace(setup, seq=512), devices)


@pytest.mark.parametrize("memory", ["affine", "quadratic"])
@pytest.mark.parametrize("planned, limit, expected", [(4, 40, 40), (4, 4, 4), (16, 9, 8), (8, 3, 0), (4, 1000, 1000),
                                                      (64, 2050, 2048)])
def test_largest_batch_search(devices, monkeypatch, planned, limit, expected, memory):
    """--largest_batch: in multiples of the batch shards (4 here), every probe a plan; the search checked
    against stand-ins whose memory grows with the batch. Affine memory (as a step's is, near enough): the
    line through two probes lands on the answer, so a handful of compiles; any other growth still ends on
    the answer, by bisection where the guesses miss."""
    calls = []
    grow = (lambda b: b) if memory == "affine" else (lambda b: b * b / limit)
    hbm = int(grow(limit + 0.5) * plan.GIB) + plan.GIB

    def fake_plan(setup, devices):
        calls.append(setup.batch)
        assert setup.batch % 4 == 0
        total = int(grow(setup.batch) * plan.GIB) + plan.GIB  # + weights: bytes = a + k * batch
        return {"fits": setup.batch <= limit, "hbm_bytes": hbm,
                "per_device_bytes": {"total": total, "temporaries": total}}

    monkeypatch.setattr(plan, "plan", fake_plan)
    setup = dataclasses.replace(_setup("tiny"), batch=planned)
    found = plan.largest_batch(setup, devices, fake_plan(setup, devices))
    assert found["largest_batch"] == expected and found["batch_unit"] == 4
    assert [p["batch"] for p in found["batch_probes"]] == calls
    assert len(calls) <= 2 + 2 * math.ceil(math.log2(max(limit, 4)))
    if memory == "affine" and limit <= 1000:  # doubling and bisection took 11 compiles for (4, 1000)
        assert len(calls) <= 6, calls
    line = plan.search_line(found)
    assert line.startswith(f"largest batch that fits: {expected or 'none'} (multiples of 4") and "does not fit" in line
