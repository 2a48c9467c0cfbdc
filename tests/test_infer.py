"""Inference: the latent cache against the full forward, ragged batches, EOS, MTP speculative
decoding (greedy identity, the rejection rule's distribution), FP8 weights, checkpoint formats,
and infer.py's output and errors."""
import functools
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import ModelConfig
from dsv3_jax.export import export
from dsv3_jax.hf import save_hf_checkpoint
from dsv3_jax.infer import cli
from dsv3_jax.infer.engine import (
    GenerateConfig,
    GenerationError,
    Generator,
    cache_bytes_per_token,
    generate,
    generator,
    pad_prompts,
    use_decode_xla_flags,
)
from dsv3_jax.infer.sampling import Sampling, draw, log_probs
from dsv3_jax.infer.weights import CheckpointError, convert_weights, load_checkpoint, runtime_for, weight_bytes
from dsv3_jax.layers.cache import LatentCache
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.ops.linear import Fp8Weight
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.loop import TrainConfig, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig.from_json("tiny")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 90))]  # ragged; the last spans two prefill buckets


@pytest.fixture(scope="module")
def variables():
    return init_variables(CFG, jax.random.PRNGKey(0))


_jit_apply = jax.jit(lambda cfg, rt, v, tokens: Transformer(cfg, rt).apply(v, tokens), static_argnums=(0, 1))


def _apply(cfg, v, tokens, runtime=Runtime()):
    return _jit_apply(cfg, runtime, v, tokens)


def _greedy_full_forward(variables, prompt, n, width=96):
    """Plain greedy decoding by full forwards, the reference: one fixed-width buffer (causal
    attention makes what lies after the cursor irrelevant), so one compilation."""
    buf = np.zeros((1, width), np.int32)
    buf[0, : len(prompt)] = prompt
    for cursor in range(len(prompt), len(prompt) + n):
        buf[0, cursor] = int(jnp.argmax(_apply(CFG, variables, buf)[0, cursor - 1]))
    return buf[0, len(prompt): len(prompt) + n].tolist()


@pytest.fixture(scope="module")
def plain(variables):
    return generate(CFG, variables, PROMPTS, GenerateConfig(max_new_tokens=10))


# -- the cache -------------------------------------------------------------------------------------

@pytest.mark.parametrize("absorbed", [False, True])
def test_cached_logits_match_the_full_forward(variables, absorbed):
    """Prefill 5 tokens, then decode 4 one at a time: each position's logits equal the full forward's;
    also with the absorbed attention weights derived once up front, as generate() does."""
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, CFG.vocab_size)
    want = Transformer(CFG).apply(variables, tokens)
    g = Generator(CFG, GenerateConfig())
    cache = g._empty_cache(2, 64, CFG.num_layers)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    step = jax.jit(lambda v, t, p, c: Transformer(CFG).apply(v, t, p, c, method=Transformer.step))
    v = Transformer(CFG).prepare_decode(variables) if absorbed else variables
    logits, _, cache = step(v, tokens[:, :5], pos, cache)
    got = [logits]
    for i in range(5, 9):
        logits, _, cache = step(v, tokens[:, i:i + 1], jnp.full((2, 1), i), cache)
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), want, rtol=1e-4, atol=1e-5)


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    names |= _primitives(sub)
    return names


@pytest.mark.parametrize("t", [1, 2])
def test_decode_attention_through_the_kernel_equals_the_xla_path(variables, t):
    """The model's cached decode through the Pallas latent-decode kernel (interpret mode, the code
    the GPU backends share; dispatch picks it for decode windows) gives the XLA path's logits and
    cache, rows of different lengths included."""
    s = 96
    tokens = jax.random.randint(jax.random.PRNGKey(3), (3, s), 0, CFG.vocab_size)
    g = Generator(CFG, GenerateConfig())
    prefill = jax.jit(lambda v, t, p, c: Transformer(CFG).apply(v, t, p, c, method=Transformer.step))
    cache = g._empty_cache(3, s, CFG.num_layers)
    _, _, cache = prefill(variables, tokens, jnp.broadcast_to(jnp.arange(s), (3, s)), cache)  # every slot filled
    positions = jnp.array([0, 40, 90])[:, None] + jnp.arange(t)
    window = tokens[:, :t]
    out = {}
    for name, rt in (("kernel", Runtime(kernel_backend="interpret")), ("xla", Runtime())):
        step = lambda v, w, p, c, rt=rt: Transformer(CFG, rt).apply(v, w, p, c, method=Transformer.step)
        prims = _primitives(jax.make_jaxpr(step)(variables, window, positions, cache).jaxpr)
        assert ("pallas_call" in prims) == (name == "kernel"), name
        out[name] = jax.jit(step)(variables, window, positions, cache)
    (logits_k, h_k, cache_k), (logits_x, h_x, cache_x) = out["kernel"], out["xla"]
    np.testing.assert_allclose(logits_k, logits_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_k, h_x, rtol=1e-5, atol=1e-5)
    for a, b in zip(cache_k, cache_x, strict=True):
        np.testing.assert_allclose(a.rows, b.rows, rtol=1e-5, atol=1e-5)


def test_decode_steps_compile_once(variables):
    g = Generator(CFG, GenerateConfig(max_new_tokens=50, speculative="mtp"))
    tokens, lengths = pad_prompts(PROMPTS)
    state, _ = g.prefill(variables, tokens, lengths, 192)
    for _ in range(3):
        state, _ = g.step(variables, state)
    assert g.step._cache_size() == 1 and g.prefill._cache_size() == 1


def test_generate_again_with_the_same_settings_compiles_nothing(variables):
    gen = GenerateConfig(max_new_tokens=6, speculative="mtp")
    first = generate(CFG, variables, PROMPTS[:2], gen)
    g = generator(CFG, gen, None, Runtime())
    other = generate(CFG, variables, [[3, 4], [5, 6, 7]], gen)  # other prompts, the same padded shapes
    again = generate(CFG, variables, PROMPTS[:2], gen)
    assert generator(CFG, gen, None, Runtime()) is g and g.step._cache_size() == 1 and len(g._compiled) == 2
    assert other.compile_s < first.compile_s and again.tokens == first.tokens


def test_ragged_batch_decodes_each_prompt_as_alone(variables, plain):
    for prompt, got in zip(PROMPTS, plain.tokens):
        assert got == _greedy_full_forward(variables, prompt, 10)


def test_each_row_stops_at_its_own_eos(variables, plain):
    eos = plain.tokens[0][3]  # row 0 makes this token 4th; other rows may make it elsewhere or never
    res = generate(CFG, variables, PROMPTS, GenerateConfig(max_new_tokens=10, eos_id=eos))
    for full, got in zip(plain.tokens, res.tokens):
        want = full[: full.index(eos) + 1] if eos in full else full
        assert got == want
    assert len(res.tokens[0]) == 4


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_steps_per_call_changes_only_the_chunking(variables, plain, steps_per_call):
    """Several decode steps per call into the compiled program (default 8; a call stops early once
    every row is done, EOS mid-call included) give the same tokens, step counts and stream."""
    eos = plain.tokens[0][3]
    want = generate(CFG, variables, PROMPTS, GenerateConfig(max_new_tokens=10, eos_id=eos))
    streamed = [[] for _ in PROMPTS]
    gen = GenerateConfig(max_new_tokens=10, eos_id=eos, steps_per_call=steps_per_call)
    got = generate(CFG, variables, PROMPTS, gen, on_tokens=lambda i, new: streamed[i].extend(new))
    assert got.tokens == want.tokens == streamed and len(got.tokens[0]) == 4
    assert (got.steps, got.row_steps) == (want.steps, want.row_steps) == (9, sum(len(t) - 1 for t in want.tokens))


def test_pinned_cache_layout_decodes_the_same(variables, plain, monkeypatch):
    """The step with its caches' rows pinned row-major (what TPU targets get: `Generator.pin_rows`) generates what
    the plain step does; on CPU row-major is the default layout, so the same program modulo its formats."""
    generator.cache_clear()
    made = []
    init = Generator.__init__

    def pinned(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.pin_rows = True
        made.append(self)

    monkeypatch.setattr(Generator, "__init__", pinned)
    try:
        res = generate(CFG, variables, PROMPTS, GenerateConfig(max_new_tokens=10))
    finally:
        generator.cache_clear()
    assert res.tokens == plain.tokens
    assert made and made[0]._pinned  # the pinned step ran


def test_decode_step_updates_the_cache_in_place(variables):
    """The compiled decode program never copies a layer's cache (a regression once cost 16 copies per
    step at batch 1: XLA:CPU duplicated the cache write into each reader)."""
    for batch in (1, 3):
        g = Generator(CFG, GenerateConfig())
        tokens, lengths = pad_prompts(PROMPTS[:batch])
        state, _ = g.prefill(variables, tokens, lengths, 128)
        hlo = g.step.lower(variables, state).compile().as_text()
        shape = f"f32[{batch * 128},{CFG.kv_cache_dim}]"
        assert f"= {shape}" in hlo and not [x for x in hlo.splitlines() if f"= {shape}" in x and " copy(" in x]


def test_cache_write_stays_inside_each_row():
    """The flat cache [B*S, C+R]: a window running past its row's S slots is cut there, never
    written into the next row's slots."""
    new = jnp.ones((2, 3, 2)) * jnp.array([1.0, 2.0])[:, None, None]
    cache = LatentCache.empty(2, 4, 2, jnp.float32).write(new, jnp.array([2, 1]))
    assert cache.rows.shape == (2 * 4, 2) and cache.slots == 4 and cache.view().shape == (2, 4, 2)
    out = np.asarray(cache.rows)[:, 0]
    np.testing.assert_array_equal(out, [0, 0, 1, 1, 0, 2, 2, 2])


def test_cache_holds_the_latent_only_and_its_bytes_match_the_cost_model(variables):
    tokens, lengths = pad_prompts(PROMPTS)
    for dtype in (jnp.float32, jnp.bfloat16):
        g = Generator(CFG, GenerateConfig(), cache_dtype=dtype)
        state, _ = jax.eval_shape(functools.partial(g._prefill, cache_len=128), variables, tokens, lengths)
        # Stored flat: 128 slots for each of the 3 rows, each slot the latent and the rope key only.
        assert [c.rows.shape for c in state.cache] == [(3 * 128, CFG.kv_lora_rank + CFG.qk_rope_head_dim)] * 2
        assert [c.slots for c in state.cache] == [128] * 2
        per_token = sum(c.rows.size * c.rows.dtype.itemsize for c in state.cache) // (3 * 128)
        assert per_token == cache_bytes_per_token(CFG, dtype) == CFG.kv_cache_bytes_per_token(jnp.dtype(dtype).itemsize)
    v3 = ModelConfig.from_json("deepseek_v3_671b")
    assert cache_bytes_per_token(v3, jnp.bfloat16) == v3.kv_cache_bytes_per_token() == 70_272


def test_bad_prompts_are_clear_errors(variables):
    gen = GenerateConfig(max_new_tokens=8)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(CFG, variables, [[1], []], gen)
    with pytest.raises(GenerationError, match="token id 256 is outside the model's vocabulary"):
        generate(CFG, variables, [[1, 256]], gen)
    with pytest.raises(GenerationError, match="context of 512 tokens .at most 12 new tokens fit"):
        generate(CFG, variables, [[1] * 500], GenerateConfig(max_new_tokens=20))
    with pytest.raises(GenerationError, match="the prompt alone does not fit"):
        generate(CFG, variables, [[1] * 600], gen)


# -- sampling and the acceptance rule --------------------------------------------------------------

def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = lambda s: np.isfinite(np.asarray(log_probs(logits, s)))
    assert kept(Sampling(1.0, top_k=2)).tolist() == [True, True, False, False, False]
    assert kept(Sampling(1.0, top_p=0.7)).tolist() == [True, True, False, False, False]  # 0.5 + 0.2 reaches 0.7
    assert kept(Sampling(1.0, top_p=0.71)).tolist() == [True, True, True, False, False]
    assert kept(Sampling(0.0)).tolist() == [True, False, False, False, False]
    assert kept(Sampling(1.0, vocab_limit=3)).tolist() == [True, True, True, False, False]
    np.testing.assert_allclose(np.exp(log_probs(logits, Sampling(1.0))), np.exp(logits), rtol=1e-6)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=0)


def test_rejection_rule_keeps_the_target_distribution():
    """Drafts drawn from q and accepted by the rule give first tokens distributed as p, not q."""
    p = jnp.log(jnp.array([0.1, 0.6, 0.2, 0.1]))
    q = jnp.log(jnp.array([0.4, 0.1, 0.1, 0.4]))
    n = 40_000
    g = Generator(CFG.replace(vocab_size=4), GenerateConfig(sampling=Sampling(1.0)))

    def once(key):
        k1, k2 = jax.random.split(key)
        d = draw(k1, q)[None, None]
        a, nxt = g._accept(jnp.broadcast_to(p, (1, 2, 4)), d, q[None, None], k2)
        return jnp.where(a[0] > 0, d[0, 0], nxt[0])

    first = jax.jit(jax.vmap(once))(jax.random.split(jax.random.PRNGKey(0), n))
    freq = np.bincount(np.asarray(first), minlength=4) / n
    np.testing.assert_allclose(freq, np.exp(p), atol=0.01)  # 4 sigma of a binomial at n=40k is ~0.01


def test_greedy_acceptance_is_exact_match():
    g = Generator(CFG.replace(vocab_size=5), GenerateConfig())
    target = jnp.array([[2, 3, 4], [2, 3, 4]])  # argmax at each of the 3 window positions
    p = log_probs(jax.nn.one_hot(target, 5) * 5.0, Sampling())
    drafts = jnp.array([[2, 3], [2, 1]])
    q = log_probs(jax.nn.one_hot(drafts, 5) * 5.0, Sampling())
    a, nxt = g._accept(p, drafts, q, jax.random.PRNGKey(0))
    assert a.tolist() == [2, 1] and nxt.tolist() == [4, 3]


# -- MTP speculative decoding on a model that has learned something --------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny preset trained briefly on a repetitive text, so MTP drafts are often right."""
    root = tmp_path_factory.mktemp("trained")
    (root / "corpus").mkdir()
    line = "the quick brown fox jumps over the lazy dog\n"
    for k in range(3):
        (root / "corpus" / f"part{k}.txt").write_text(line * 300)
    tc = TrainConfig(workdir=str(root / "wd"), data=(str(root / "corpus"),), steps=60, batch_size=8, seq_len=64,
                     warmup_steps=5, checkpoint_every=0, eval_batches=1, eval_every=1000, log_every=1000,
                     sample_tokens=0, plots=False)
    run(tc)
    return str(root / "wd")


def test_speculative_greedy_equals_plain_greedy(trained):
    cfg, variables, _ = load_checkpoint(trained)
    prompts = [list(b"the quick"), list(b"over the la"), list(b"fox")]
    plain = generate(cfg, variables, prompts, GenerateConfig(max_new_tokens=40))
    spec = generate(cfg, variables, prompts, GenerateConfig(max_new_tokens=40, speculative="mtp"))
    assert spec.tokens == plain.tokens
    assert spec.acceptance_rate > 0.5  # the drafts are mostly right, so acceptance paths were taken
    assert 1.5 < spec.accepted_per_step <= 2 and spec.steps < plain.steps
    assert bytes(plain.tokens[0][:12]) == b" brown fox j"  # it did learn the text


def test_speculative_sampling_runs_to_length(trained):
    cfg, variables, _ = load_checkpoint(trained)
    gen = GenerateConfig(max_new_tokens=30, sampling=Sampling(0.8, top_k=20), speculative="mtp", seed=3)
    res = generate(cfg, variables, [list(b"the "), list(b"dog")], gen)
    assert [len(t) for t in res.tokens] == [30, 30]
    assert 0 <= res.acceptance_rate <= 1 and all(0 <= t < 256 for row in res.tokens for t in row)


# -- FP8 and BF16 weights --------------------------------------------------------------------------

def test_fp8_weights_are_8_bit_and_close(variables):
    v8 = convert_weights(CFG, variables, "fp8")
    v16 = convert_weights(CFG, variables, "bf16")
    assert runtime_for("fp8") == runtime_for("bf16") == Runtime(dtype="bfloat16")  # never FP8 training GEMMs
    w1 = v8["params"]["layers_1"]["ffn"]["w1"]
    assert isinstance(w1, Fp8Weight) and w1.q.dtype == jnp.float8_e4m3fn
    assert w1.q.shape == (CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size)  # our layout
    assert w1.scale.shape == (CFG.n_routed_experts, 1, 1)  # 128x128 blocks of each expert's [out, in]
    assert v8["params"]["embed"].dtype == jnp.bfloat16 and not isinstance(v8["params"]["embed"], Fp8Weight)
    assert weight_bytes(v8) < weight_bytes(v16) < weight_bytes(variables)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, CFG.vocab_size)
    ref = _apply(CFG, variables, tokens)
    # bf16 and fp8 weights at the runtime that serves them (bf16 compute), and fp8 weights at fp32 compute.
    for rt, v, bound in ((runtime_for("bf16"), v16, 0.03), (runtime_for("fp8"), v8, 0.08), (Runtime(), v8, 0.08)):
        got = _apply(CFG, v, tokens, rt)
        rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        assert rel < bound, (rt.dtype, rel)


def test_fp8_hugging_face_checkpoint_loads_without_expansion(variables, tmp_path):
    hf = tmp_path / "hf"
    save_hf_checkpoint(CFG, variables, str(hf), weights="fp8")
    cfg8, v8, tok = load_checkpoint(str(hf), "fp8")
    assert tok is None  # no tokenizer.json in the directory
    for path in (("layers_0", "attn", "wkv_b"), ("layers_1", "ffn", "w2"), ("mtp_0", "block", "ffn", "w3")):
        leaf = v8["params"]
        for k in path:
            leaf = leaf[k]
        assert isinstance(leaf, Fp8Weight) and leaf.q.dtype == jnp.float8_e4m3fn, path
    # The file's own 8-bit values, not a re-quantisation of something expanded on the way in.
    from dsv3_jax.safetensors_io import SafetensorsDir
    raw = SafetensorsDir(str(hf)).get("model.layers.1.mlp.experts.3.down_proj.weight")
    np.testing.assert_array_equal(np.asarray(v8["params"]["layers_1"]["ffn"]["w2"].q[3]).T.view(np.uint8),
                                  raw.view(np.uint8))
    cfg_full, v_full, _ = load_checkpoint(str(hf), "bf16")  # the same file, dequantised at load
    tokens = jnp.arange(12)[None] % CFG.vocab_size
    assert cfg8 == cfg_full
    a, b = _apply(cfg8, v8, tokens, runtime_for("fp8")), _apply(cfg_full, v_full, tokens, runtime_for("bf16"))
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(b).max())


# -- checkpoint formats and infer.py ---------------------------------------------------------------

def test_every_checkpoint_layout_loads_the_same_model(trained, tmp_path):
    out = export(trained, str(tmp_path / "exp"), hf=True)
    cfg_w, v_w, tok_w = load_checkpoint(trained)
    cfg_e, v_e, tok_e = load_checkpoint(out["out"])
    cfg_h, v_h, tok_h = load_checkpoint(out["hf"])
    assert tok_w == tok_e == "byte" and tok_h is None
    tokens = jnp.asarray([list(b"the quick")])
    ref = _apply(cfg_w, v_w, tokens)
    np.testing.assert_allclose(_apply(cfg_e, v_e, tokens), ref, rtol=1e-6)
    np.testing.assert_allclose(_apply(cfg_h, v_h, tokens), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="not a checkpoint this tool knows"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(str(tmp_path / "missing"))


def _flags(**kw):
    base = dict(checkpoint=None, prompt=[], prompts_file=None, prompt_ids=[], tokenizer=None, max_new_tokens=16,
                temperature=0.0, top_p=1.0, top_k=0, seed=0, speculative="none", compare_plain=True,
                weights="fp32", steps_per_call=8, experts="auto", attention="auto", json=True, kv_cache=None,
                index_cache=None)
    return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("change,message", [
    ({"prompt": [""]}, "prompt 0 is empty"),
    ({"prompt_ids": ["1,2,999"]}, "token id 999 is outside"),
    ({"prompt": ["x" * 600]}, "context of 512 tokens"),
    ({"prompt": ["a"], "top_p": 0.0}, "top_p must be in"),
    ({"prompt": ["a"], "steps_per_call": 0}, "steps_per_call must be >= 1"),
    ({}, "give a prompt"),
])
def test_infer_bad_input_is_one_clear_error(trained, change, message):
    with pytest.raises(GenerationError, match=message):
        cli.run(_flags(checkpoint=trained, **change))


def test_infer_batch_from_a_prompts_file_with_fp8_weights(trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\n\nover the la\n")  # the blank line is skipped
    out = cli.run(_flags(checkpoint=trained, prompts_file=str(prompts), weights="fp8", max_new_tokens=12))
    printed = capsys.readouterr().out.splitlines()
    assert out["batch"] == 2 and len(out["text"]) == 2 and [len(t) for t in out["tokens"]] == [12, 12]
    assert printed == [f"[0] the quick{out['text'][0]}", f"[1] over the la{out['text'][1]}"]  # each with its prompt
    assert out["text"][0].startswith(" brown")  # 8-bit weights still know the text
    assert out["kv_cache_bytes_per_token"] == CFG.kv_cache_bytes_per_token(2)  # bf16 compute and cache
    assert out["weights"] == "fp8" and out["weight_bytes"] < weight_bytes(load_checkpoint(trained, "bf16")[1])


def test_decode_xla_flags_are_added_once_and_never_override_the_user():
    env = {}
    use_decode_xla_flags(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    use_decode_xla_flags(env)  # idempotent
    assert env["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    use_decode_xla_flags(env)  # appended to the user's flags
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                        "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    env = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
    use_decode_xla_flags(env)  # the user's own setting stands
    assert env["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"


def test_infer_sets_the_decode_xla_flags_before_it_runs(monkeypatch):
    class Flags(types.SimpleNamespace):
        def __getitem__(self, name):  # absl's FLAGS["verbosity"].present
            return types.SimpleNamespace(present=True)

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    seen = []
    monkeypatch.setattr(cli, "run", lambda f: seen.append(os.environ["XLA_FLAGS"]) or {"text": ""})
    cli.main(["infer.py"], Flags(**vars(_flags(checkpoint="somewhere"))))
    assert seen == ["--xla_cpu_use_thunk_runtime=true --xla_cpu_enable_concurrency_optimized_scheduler=false"]


def test_infer_py_streams_and_reports_json(trained):
    r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), f"--checkpoint={trained}",
                        "--prompt=the quick", "--max_new_tokens=24", "--speculative=mtp", "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    out = json.loads(lines[-1])
    assert out["text"].startswith(" brown fox") and lines[0].startswith("the quick" + out["text"].splitlines()[0])
    assert len(out["tokens"]) == 24 and out["kv_cache_bytes_per_token"] == CFG.kv_cache_bytes_per_token(4)
    assert out["same_as_plain"] is True and out["acceptance_rate"] > 0.5 and out["accepted_per_step"] > 1.5
    for key in ("tokens_per_s", "prefill_s", "speedup", "plain_tokens_per_s", "weight_bytes"):
        assert out[key] > 0, key


def test_infer_py_bad_checkpoint_exits_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), f"--checkpoint={tmp_path}", "--prompt=x"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"infer.py: --checkpoint {tmp_path}: not a checkpoint this tool "
                                             "knows; expected a training workdir (checkpoints/), an export "
                                             "(model_config.json + orbax/) or a Hugging Face directory "
                                             "(config.json + *.safetensors)"]
