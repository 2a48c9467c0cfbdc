"""DeepSeek Sparse Attention against dense attention, same model and weights, same run (issue 17).

The model is the `small_dsa` preset with index_topk 256 (and a context long enough for the runs); "dense" is
the same weights with index_topk past the context, where MLA takes the V3 attention (`dispatch.dsa_sparse`).
For each context length, batch 1, float32 weights and activations, both models' latent caches in `--cache`
(float32 or bfloat16) and DSA's indexer keys in `--index_cache` (unset: as the latent cache; the engine's
`--index_cache`):
  - prefill tokens/s: one forward of a prompt of that length over an empty cache (as the engine's prefill:
    latent rows and indexer keys written while at it);
  - decode tokens/s: `--new` single-token steps at that position over a cache of that many tokens. A
    decode step's cost depends on the cache's slots, not on how its rows were made, so the cache is filled
    with random latent rows and indexer keys instead of a prefill (quicker to make);
  - dense and DSA are timed alternately, repeat by repeat, after a warm-up of each (`interleaved`), so both see
    the same background load on a shared machine; medians;
  - the cache's bytes per token, all layers: latent rows plus indexer keys (DSA) against latent rows only;
  - agreement: the sparse op (`ops.sparse_attention`) against its masked-dense reference on the same
    selections, the indexer's top-k of the random keys, max abs difference over the last `--check` queries.

Usage: python benchmarks/sparse_attention.py [--prefill 4096,16384,32768] [--decode 4096,16384,32768]
       [--new 16] [--repeats 2] [--cache float32|bfloat16] [--index_cache float32|bfloat16] [--quick] [--json]
       python benchmarks/sparse_attention.py --indexer_layouts 1x32768,8x32768   # the indexer's score layouts
       python benchmarks/sparse_attention.py --top_k 1x32768,64x32768           # ops.top_k's variants
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.engine import cache_bytes_per_token, resolve_index_dtype, use_decode_xla_flags
from dsv3_jax.layers.cache import LatentCache, stored
from dsv3_jax.layers.indexer import index_scores, select
from dsv3_jax.model import Transformer, init_variables
from dsv3_jax.ops.attention import KvWeights
from dsv3_jax.ops.sparse_attention import masked_dense_attention, sparse_attention
from dsv3_jax.ops.top_k import TOP_K

TOPK = 256
QUICK = dict(prefill=[512, 1024], decode=[512, 2048], new=4, repeats=1, check=4)


def configs(max_context: int) -> tuple[ModelConfig, ModelConfig]:
    """(DSA, dense) on the same weights: the dense one's top-k covers every slot."""
    cfg = ModelConfig.from_json("small_dsa").replace(index_topk=TOPK, max_position_embeddings=max_context)
    return cfg, cfg.replace(index_topk=max_context)


def _step_fn(cfg: ModelConfig, from_start: bool = False):
    """The model's cached step, jitted; `from_start`: a prefill from an empty cache, as the engine's (positions
    0..T-1 vouched for: `Transformer.step`'s sorted_positions)."""
    model = Transformer(cfg)
    return jax.jit(lambda v, t, p, c: model.apply(v, t, p, c, None, from_start, method=Transformer.step),
                   donate_argnums=3)


def _empty(cfg: ModelConfig, slots: int, dtypes) -> tuple[LatentCache, ...]:
    return tuple(LatentCache.empty(1, slots, cfg.kv_cache_dim, dtypes[0], index_dim=cfg.index_head_dim,
                                   index_dtype=dtypes[1]) for _ in range(cfg.num_layers))


def _random(cfg: ModelConfig, slots: int, seed: int, dtypes=(jnp.float32, jnp.float32)) -> tuple[LatentCache, ...]:
    """Caches of unit-scale rows: c_kv is RMS-normalised and the indexer key LayerNorm-ed, so both have
    about unit entries."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * cfg.num_layers)
    return tuple(LatentCache(jax.random.normal(keys[2 * i], (slots, cfg.kv_cache_dim)).astype(dtypes[0]), slots,
                             index_keys=stored(jax.random.normal(keys[2 * i + 1], (cfg.index_head_dim, slots))
                                                     .astype(dtypes[1])))
                 for i in range(cfg.num_layers))


def _ready(fn, args):
    return jax.block_until_ready(fn(*args))


def _median_s(fn, repeats: int) -> float:
    fn()  # compiles and warms
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _prefill_run(cfg, variables, length: int, dtype):
    """() -> seconds of one prefill of `length` tokens."""
    step = _step_fn(cfg, from_start=True)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, length)), jnp.int32)
    positions = jnp.arange(length, dtype=jnp.int32)[None]

    def run():
        cache = _empty(cfg, length, dtype)
        t0 = time.perf_counter()
        jax.block_until_ready(step(variables, tokens, positions, cache)[0])
        return time.perf_counter() - t0

    return run


def _decode_run(cfg, variables, context: int, new: int, dtype):
    """() -> seconds of `new` decode steps over a random cache of `context` tokens. The steps' inputs are made
    before the clock starts: building a position array on the host costs ~0.6 ms of dispatch here, a quarter of
    a DSA step at 32K, and belongs to neither attention."""
    step, slots = _step_fn(cfg), context + new
    token = jnp.ones((1, 1), jnp.int32)
    positions = [jnp.full((1, 1), context + i, jnp.int32) for i in range(new)]

    def run():
        cache = _random(cfg, slots, 0, dtype)
        jax.block_until_ready((cache, positions))
        t0 = time.perf_counter()
        for pos in positions:
            logits, _, cache = step(variables, token, pos, cache)
        jax.block_until_ready(logits)
        return time.perf_counter() - t0

    return run


def interleaved(dense_run, dsa_run, repeats: int) -> tuple[float, float]:
    """Median seconds of each, timed alternately (dense, DSA, dense, ...) after one warm-up run each: on a
    shared machine both see the same background, so their ratio is fair even when the load changes."""
    dense_run(), dsa_run()  # compile and warm
    times = [(dense_run(), dsa_run()) for _ in range(repeats)]
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def agreement(cfg, variables, context: int, queries: int) -> float:
    """max |sparse - masked dense| for the last `queries` positions of a random cache of `context` tokens, the
    indexer's selection of random queries (layer 0's wkv_b)."""
    cache = _random(cfg, context, 1)[0]
    k = jax.random.split(jax.random.PRNGKey(2), 4)
    h, n, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    positions = jnp.arange(context - queries, context, dtype=jnp.int32)[None]
    q_index = jax.random.normal(k[0], (1, queries, cfg.index_n_heads, cfg.index_head_dim))
    w_index = jax.random.normal(k[1], (1, queries, cfg.index_n_heads))
    indices = select(index_scores(q_index, w_index, cache.index_view(), positions, None, keys_t=True), cfg.index_topk)
    q_nope, q_pe = jax.random.normal(k[2], (1, queries, h, n)), jax.random.normal(k[3], (1, queries, h, r))
    w = KvWeights(variables["params"]["layers_0"]["attn"]["wkv_b"])
    args = (q_nope, q_pe, cache.view(), positions, None, indices, w, cfg.softmax_scale)
    return float(jnp.abs(sparse_attention(*args) - masked_dense_attention(*args)).max())


def indexer_layouts(cases: list[tuple[int, int]], cfg: ModelConfig, repeats: int = 20) -> dict:
    """ms of the indexer's scores (`index_scores`) for T queries over S keys, batch 1, the keys held as rows [S, I]
    (as the uncached indexer computes them) and transposed [I, S] (as `LatentCache.index_keys` holds them): what
    the cache's layout rests on."""
    out = {}
    for t, s in cases:
        k = jax.random.split(jax.random.PRNGKey(t * 7919 + s), 3)
        q = jax.random.normal(k[0], (1, t, cfg.index_n_heads, cfg.index_head_dim))
        w = jax.random.normal(k[1], (1, t, cfg.index_n_heads))
        keys = jax.random.normal(k[2], (1, s, cfg.index_head_dim))
        positions = jnp.full((1, t), s - 1, jnp.int32)
        row = {}
        for name, held in (("rows_ms", keys), ("transposed_ms", jnp.swapaxes(keys, 1, 2))):
            fn = jax.jit(functools.partial(index_scores, kv_positions=None, keys_t=held is not keys))
            args = (q, w, jax.block_until_ready(held), positions)
            row[name] = 1e3 * _median_s(functools.partial(_ready, fn, args), repeats)
        out[f"{t}x{s}"] = row
        print(f"indexer scores T={t:>4} S={s:>6}: keys [S, I] {row['rows_ms']:.3f} ms  "
              f"[I, S] {row['transposed_ms']:.3f} ms", flush=True)
    return out


def top_k_variants(cases: list[tuple[int, int]], k: int = TOPK, repeats: int = 20) -> dict:
    """ms of each `ops.top_k` variant (`dispatch.top_k`'s choices) taking the best `k` of R rows of S indexer-like
    scores (sum of ReLUs of 4 random heads, one in ~10 causally hidden: -inf), timed alternately, and whether
    they agree. What `dispatch.top_k` rests on: a decode step asks for R = 1 per layer, a prefill chunk for many."""
    out = {}
    for r, s in cases:
        g = np.random.RandomState(r * 7919 + s)
        x = np.einsum("h,rhs->rs", g.randn(4), np.maximum(g.randn(r, 4, s), 0)).astype(np.float32)
        x[:, s - s // 10:] = -np.inf
        x = jax.block_until_ready(jnp.asarray(x))
        fns = {name: jax.jit(functools.partial(TOP_K[name], k=k)) for name in TOP_K.names}
        results = {name: jax.block_until_ready(fn(x)) for name, fn in fns.items()}
        same = all(jnp.array_equal(results[n][1], results[TOP_K.reference][1]) for n in fns)
        times = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(x))
                times[name].append(time.perf_counter() - t0)
        row = {f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()}
        out[f"{r}x{s}"] = {**row, "same_indices": same}
        print(f"top_k {k} of R={r:>4} x S={s:>6}: " + "  ".join(f"{n} {v:.3f} ms" for n, v in row.items())
              + f"  same indices: {same}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefill", default="4096,16384,32768", help="prompt lengths, comma-separated")
    p.add_argument("--decode", default="4096,16384,32768", help="cache lengths of the decode runs")
    p.add_argument("--new", type=int, default=16, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--check", type=int, default=16, help="queries of the agreement check")
    p.add_argument("--quick", action="store_true", help=f"short contexts, for a test: {QUICK}")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache", default="float32", choices=["float32", "bfloat16"],
                   help="the latent caches' dtype, both models")
    p.add_argument("--index_cache", default=None, choices=["float32", "bfloat16"],
                   help="DSA's indexer keys (unset: as --cache)")
    p.add_argument("--indexer_layouts", default="",
                   help="only time the indexer's scores over keys [S, I] and [I, S] at TxS cases, e.g. "
                        "1x32768,8x32768,4096x4096")
    p.add_argument("--top_k", default="", help="only time ops.top_k's variants on RxS cases, e.g. 1x32768,64x32768")
    a = p.parse_args(argv)
    if a.top_k:
        cases = [tuple(int(v) for v in c.split("x")) for c in a.top_k.split(",")]
        out = {"k": TOPK, "top_k": top_k_variants(cases)}
        if a.json:
            print(json.dumps(out))
        return out
    if a.indexer_layouts:
        cases = [tuple(int(v) for v in c.split("x")) for c in a.indexer_layouts.split(",")]
        out = {"config": "small_dsa", "indexer_layouts": indexer_layouts(cases, configs(max(s for _, s in cases))[0])}
        if a.json:
            print(json.dumps(out))
        return out
    prefill = [int(x) for x in a.prefill.split(",") if x]
    decode = [int(x) for x in a.decode.split(",") if x]
    new, repeats, check = a.new, a.repeats, a.check
    cache = jnp.dtype(a.cache), resolve_index_dtype(a.index_cache, jnp.dtype(a.cache))
    if a.quick:
        prefill, decode, new, repeats, check = (QUICK[k] for k in ("prefill", "decode", "new", "repeats", "check"))
    cfg, dense = configs(max(prefill + [d + new for d in decode]))
    variables = Transformer(cfg).prepare_decode(init_variables(cfg, jax.random.PRNGKey(0)))
    v3 = cfg.replace(index_n_heads=0, index_head_dim=0, index_topk=0)
    out = {"config": "small_dsa", "index_topk": TOPK, "device": jax.devices()[0].device_kind,
           "cache": a.cache, "index_cache": str(cache[1]),
           "cache_bytes_per_token": {"dsa": cache_bytes_per_token(cfg, cache[0], index_dtype=cache[1]),
                                     "dense": cache_bytes_per_token(v3, cache[0])},
           "prefill": {}, "decode": {}}
    for t in prefill:
        d, s = (t / sec for sec in interleaved(_prefill_run(dense, variables, t, cache),
                                               _prefill_run(cfg, variables, t, cache),
                                               repeats))
        out["prefill"][t] = {"dense_tokens_per_s": d, "dsa_tokens_per_s": s, "speedup": s / d}
        print(f"prefill {t:>6}: dense {d:9.1f} tok/s  dsa {s:9.1f} tok/s  x{s / d:.2f}", flush=True)
    for t in decode:
        runs = (_decode_run(c, variables, t, new, cache) for c in (dense, cfg))
        d, s = (new / sec for sec in interleaved(*runs, repeats))
        out["decode"][t] = {"dense_tokens_per_s": d, "dsa_tokens_per_s": s, "speedup": s / d}
        print(f"decode  {t:>6}: dense {d:9.1f} tok/s  dsa {s:9.1f} tok/s  x{s / d:.2f}", flush=True)
    out["agreement_context"] = max(decode + prefill)
    out["max_abs_diff_vs_masked_dense"] = agreement(cfg, variables, out["agreement_context"], check)
    b = out["cache_bytes_per_token"]
    print(f"cache bytes/token ({a.cache}, indexer keys {cache[1]}, {cfg.num_layers} layers): dsa {b['dsa']} (latent + "
          f"indexer keys), dense {b['dense']} (latent); sparse vs masked dense at {out['agreement_context']}: max "
          f"|diff| {out['max_abs_diff_vs_masked_dense']:.2e}")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    use_decode_xla_flags()
    main()
