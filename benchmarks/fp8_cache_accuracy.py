"""FP8 against bfloat16 latent cache: how far the logits move, and how often greedy decoding still agrees.

The FP8 cache (`infer.py --kv_cache fp8`; FlashMLA's packed rows: E4M3 latent with a float32 scale per 128
values, bfloat16 rope key) halves the cache's bytes; this measures what it costs in accuracy. Per model:
1. greedy decoding over a bfloat16 cache gives a reference text (prompt + `--steps` tokens);
2. that text is fed, token by token, through caches of each dtype (teacher forcing: every cache sees the same
   tokens), and the logits at each decode position are compared: max and mean |difference|, and how often
   the greedy choice (argmax) is the same;
3. greedy decoding over each cache runs free: the fraction of positions whose token matches the reference's,
   and the step of the first difference (after it, the texts differ and so do their caches).
Each line compares a cache with the next more precise one: bfloat16 against float32 (the scale of plain
rounding), FP8 against bfloat16. The model computes in float32, so only the cache's storage differs.

Models: the presets named by --models with random weights (seed 0), and --checkpoint (any layout infer.py
loads, e.g. the quickstart's workdir after `python train.py`) if given.
Usage: python benchmarks/fp8_cache_accuracy.py [--models tiny,small] [--checkpoint workdir] [--steps 256]
       [--batch 4] [--prompt_len 16] [--json]
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.engine import GenerateConfig, cache_bytes_per_token, generate
from dsv3_jax.infer.weights import load_checkpoint
from dsv3_jax.layers.cache import FP8, LatentCache
from dsv3_jax.model import Transformer, init_variables

# Each cache against the next more precise one.
PAIRS = ((jnp.bfloat16, jnp.float32), (FP8, jnp.bfloat16))
TEXT_PROMPTS = ("def main(argv):\n    ", "import os\nimport sys\n\n", "class Parser:\n    def ", "    return self.")


def _name(cache_dtype) -> str:
    return str(cache_dtype) if cache_dtype == FP8 else jnp.dtype(cache_dtype).name


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _forced_logits(cfg: ModelConfig, variables, tokens, prompt_len: int, cache_dtype):
    """tokens [B, P+N] -> the logits [B, N, V] predicting tokens P..P+N-1: a prefill of the first P, then one
    decode step per later token (the positions a generation would decode)."""
    b, total = tokens.shape
    model = Transformer(cfg)
    cache = tuple(LatentCache.empty(b, total, cfg.kv_cache_dim, cache_dtype, cfg.kv_lora_rank)
                  for _ in range(cfg.num_layers))
    positions = jnp.broadcast_to(jnp.arange(prompt_len), (b, prompt_len))
    first, _, cache = model.apply(variables, tokens[:, :prompt_len], positions, cache,
                                  jnp.full((b,), prompt_len - 1), method=Transformer.step)

    def step(cache, i):
        logits, _, cache = model.apply(variables, tokens[:, i][:, None], jnp.full((b, 1), i), cache,
                                       method=Transformer.step)
        return cache, logits[:, 0]

    _, rest = jax.lax.scan(step, cache, jnp.arange(prompt_len, total - 1))
    return jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1)


def _prompts(cfg: ModelConfig, batch: int, prompt_len: int, text: bool) -> list[list[int]]:
    """Byte-level text for a trained byte model, random ids for random weights; all `prompt_len` long."""
    if text:
        return [list(TEXT_PROMPTS[i % len(TEXT_PROMPTS)].encode())[:prompt_len] for i in range(batch)]
    ids = jax.random.randint(jax.random.PRNGKey(1), (batch, prompt_len), 0, cfg.vocab_size)
    return np.asarray(ids).tolist()


def _free_running(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(fraction of positions with the reference's token, mean step of the first difference; the length if none)."""
    same = np.array([[a == b for a, b in zip(r, g, strict=True)] for r, g in zip(ref, got, strict=True)])
    first = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    return float(same.mean()), float(np.mean(first))


def measure(label: str, cfg: ModelConfig, variables, args: argparse.Namespace, text: bool) -> list[dict]:
    prompts = _prompts(cfg, args.batch, args.prompt_len, text)
    gen = GenerateConfig(max_new_tokens=args.steps)
    decoded = {_name(d): generate(cfg, variables, prompts, gen, cache_dtype=d).tokens
               for d in (jnp.float32, jnp.bfloat16, FP8)}
    reference = jnp.asarray(np.concatenate([np.asarray(prompts), np.asarray(decoded["bfloat16"])], axis=1))
    prepared = Transformer(cfg).prepare_decode(variables)  # as generate() decodes
    forced = {_name(d): np.asarray(_forced_logits(cfg, prepared, reference, args.prompt_len, d))
              for d in (jnp.float32, jnp.bfloat16, FP8)}
    rows = []
    for cache, base in PAIRS:
        got, want = forced[_name(cache)], forced[_name(base)]
        diff = np.abs(got - want)
        agree, first = _free_running(decoded[_name(base)], decoded[_name(cache)])
        rows.append({"model": label, "cache": _name(cache), "against": _name(base),
                     "bytes_per_token": cache_bytes_per_token(cfg, cache), "max_abs": float(diff.max()),
                     "mean_abs": float(diff.mean()), "mean_abs_logit": float(np.abs(want).mean()),
                     "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
                     "free_running_same": agree, "first_difference": first})
    return rows


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    head = ("| model | cache | against | cache B/token | max abs dlogit | mean abs dlogit | mean abs logit | "
            "top-1 agreement (forced) | same greedy tokens (free) | first difference (step) |")
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['cache']} | {r['against']} | {r['bytes_per_token']} | {r['max_abs']:.4f} | "
                     f"{r['mean_abs']:.5f} | {r['mean_abs_logit']:.4f} | {r['top1_agreement']:.2%} | "
                     f"{r['free_running_same']:.2%} | {r['first_difference']:.0f} of {args.steps} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,small", help="presets with random weights (comma-separated; '' none)")
    p.add_argument("--checkpoint", default=None, help="also a trained model: a workdir, export or HF directory")
    p.add_argument("--steps", type=int, default=256, help="greedy decode steps per prompt")
    p.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = p.parse_args()
    t0, rows = time.perf_counter(), []
    for name in filter(None, args.models.split(",")):
        cfg = ModelConfig.from_json(name)
        rows += measure(f"{name} (random)", cfg, init_variables(cfg, jax.random.PRNGKey(0)), args, text=False)
    if args.checkpoint:
        cfg, variables, tokenizer = load_checkpoint(args.checkpoint)
        rows += measure(f"{cfg.name} ({args.checkpoint})", cfg, variables, args, text=tokenizer == "byte")
    v3 = ModelConfig.from_json("deepseek_v3_671b")
    per_layer = {_name(d): cache_bytes_per_token(v3, d) // v3.num_layers for d in (jnp.bfloat16, FP8)}
    if args.json:
        print(json.dumps({"rows": rows, "v3_bytes_per_token_per_layer": per_layer, "steps": args.steps,
                          "batch": args.batch, "prompt_len": args.prompt_len}))
        return
    print(_table(rows, args))
    print(f"\nDeepSeek-V3 cache per token and layer: bf16 {per_layer['bfloat16']} B, fp8 {per_layer['fp8']} B "
          f"({per_layer['fp8'] / per_layer['bfloat16']:.0%}); {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
