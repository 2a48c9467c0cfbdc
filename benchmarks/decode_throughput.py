"""Inference throughput on the `small` preset against transformers' PyTorch DeepseekV3, same run; and
MTP speculative decoding against plain decoding on the model the README's main command trains.

Part 1, ours vs the peer, the same weights (ours, saved in DeepSeek's layout and loaded by
transformers), greedy, no EOS, for each case (batch, prompt length) with 128 new tokens:
  - prefill tokens/s: one forward over the prompts (ours fills the latent cache while at it);
  - decode tokens/s: new tokens after the first, over the time after the prefill (ours: the
    jitted step loop, streaming each token to the host; the peer: model.generate with its KV
    cache, minus the same prefill forward);
  - agree: how many leading greedy tokens of row 0 match between the two (a check that both
    run the same model; float32 rounding may part them after a while).
Part 2, on --mtp_checkpoint (default: ./workdir, what `python train.py` writes): prompts cut from
held-out text, greedy, plain vs --speculative=mtp at batch 1 (each prompt alone) and with all the
prompts in one batch: tokens/s, the speed-up (median of --mtp_repeats interleaved repeats, and their
range), acceptance, tokens per step, and whether the outputs are identical (they must be).

Usage: python benchmarks/decode_throughput.py [--cases 1x128,8x128,1x1024,8x1024] [--new 128]
       [--repeats 2] [--mtp_checkpoint workdir] [--mtp_repeats 5] [--no_peer] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
from peer_device import torch_device, torch_sync

from dsv3_jax.config import ModelConfig
from dsv3_jax.data.corpus import default_corpus_files, read_documents, split_documents
from dsv3_jax.data.tokenizer import load_tokenizer
from dsv3_jax.hf import save_hf_checkpoint
from dsv3_jax.infer.engine import GenerateConfig, cache_bytes_per_token, generate, use_decode_xla_flags
from dsv3_jax.infer.weights import load_checkpoint
from dsv3_jax.model import init_variables
from dsv3_jax.runtime import Runtime

RUNTIME = Runtime()  # float32 activations and cache, as the peer runs; dispatch picks the variants


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    return np.random.RandomState(seed).randint(1, vocab, (batch, length)).tolist()


def ours(cfg: ModelConfig, variables: dict, batch: int, length: int, new: int, repeats: int) -> dict:
    runs = [generate(cfg, variables, _prompts(batch, length, cfg.vocab_size), GenerateConfig(max_new_tokens=new),
                     warm_prefill=True, runtime=RUNTIME) for _ in range(repeats)]
    return {"prefill_tokens_per_s": batch * length / statistics.median(r.prefill_s for r in runs),
            "decode_tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
            "compile_s": runs[0].compile_s, "tokens": runs[0].tokens[0]}


def load_peer(cfg: ModelConfig, variables: dict):
    try:
        import torch
        from transformers import DeepseekV3ForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as d:
        save_hf_checkpoint(cfg.replace(mtp_depth=0), variables, d)
        model = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    return model.to(torch_device()).eval()


def peer(model, cfg: ModelConfig, batch: int, length: int, new: int, repeats: int) -> dict:
    import torch

    device = model.device.type
    prompt = torch.tensor(_prompts(batch, length, cfg.vocab_size), device=device)
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        model(prompt)  # warm-up
        prefill = statistics.median(_timed(lambda: model(prompt), device) for _ in range(repeats))
        gen = lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=0)
        total = statistics.median(_timed(gen, device) for _ in range(repeats))
        tokens = gen()[0, length:].tolist()
    return {"prefill_tokens_per_s": batch * length / prefill,
            "decode_tokens_per_s": batch * (new - 1) / max(total - prefill, 1e-9), "tokens": tokens}


def _timed(fn, device: str = "cpu") -> float:
    t = time.perf_counter()
    fn()
    torch_sync(device)
    return time.perf_counter() - t


def _agree(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def heldout_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, cut from the starts of held-out documents of the default corpus."""
    _, held = split_documents(read_documents(default_corpus_files()))
    ids = [tokenizer.encode(d)[:length] for d in held]
    return [p for p in ids if len(p) == length][:count]


def _decode_rate(results: list) -> float:
    """Decode tokens per second over several generations together."""
    return sum(r.new_tokens - len(r.tokens) for r in results) / sum(r.decode_s for r in results)


def mtp(path: str, prompts: int, length: int, new: int, repeats: int) -> dict:
    """Plain vs MTP decoding at batch 1 (every prompt alone, one after another) and at batch
    `prompts` (all together). Interleaved repeats, so a burst of load on the machine hits both modes
    alike; the speed-up is the median of the repeats' ratios, with their range."""
    cfg, variables, tok_spec = load_checkpoint(path)
    tokenizer = load_tokenizer(tok_spec or "byte")
    ps = heldout_prompts(tokenizer, prompts, length)
    out = {"checkpoint": path, "prompts": len(ps), "prompt_tokens": length, "new": new, "repeats": repeats}
    for batch in (1, len(ps)):
        groups = [ps[i: i + batch] for i in range(0, len(ps), batch)]
        runs = {"none": [], "mtp": []}
        for _ in range(repeats):
            for mode, rs in runs.items():
                rs.append([generate(cfg, variables, rows, GenerateConfig(
                    max_new_tokens=new, speculative=mode, eos_id=tokenizer.eos_id), runtime=RUNTIME)
                    for rows in groups])
        ratios = [_decode_rate(m) / _decode_rate(p) for p, m in zip(runs["none"], runs["mtp"])]
        plain, spec = runs["none"][0], runs["mtp"][0]
        out[f"batch{batch}"] = {
            "plain_tokens_per_s": statistics.median(map(_decode_rate, runs["none"])),
            "mtp_tokens_per_s": statistics.median(map(_decode_rate, runs["mtp"])),
            "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
            "acceptance_rate": sum(r.accepted for r in spec) / sum(r.drafted for r in spec),
            "accepted_per_step": sum(r.new_tokens - len(r.tokens) for r in spec) / sum(r.row_steps for r in spec),
            "identical": all(p.tokens == m.tokens for p, m in zip(plain, spec)),
            "sample": tokenizer.decode(ps[0][-40:]) + " ⟶ " + tokenizer.decode(spec[0].tokens[0][:60])}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--cases", default="1x128,8x128,1x1024,8x1024", help="batch x prompt tokens, comma-separated")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no_peer", action="store_true")
    p.add_argument("--mtp_checkpoint", default="workdir")
    p.add_argument("--mtp_prompts", type=int, default=8)
    p.add_argument("--mtp_prompt_tokens", type=int, default=64)
    p.add_argument("--mtp_repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    use_decode_xla_flags()  # as infer.py runs; before jax's first computation

    cfg = ModelConfig.from_json(a.config)
    variables = init_variables(cfg, jax.random.PRNGKey(0))
    out = {"config": a.config, "backend": jax.default_backend(), "new_tokens": a.new,
           "kv_cache_bytes_per_token": cache_bytes_per_token(cfg, RUNTIME.dtype), "cases": {}}
    model = None if a.no_peer else load_peer(cfg, variables)
    for case in a.cases.split(","):
        batch, length = (int(x) for x in case.split("x"))
        row = {"ours": ours(cfg, variables, batch, length, a.new, a.repeats)}
        if model is not None:
            row["peer"] = peer(model, cfg, batch, length, a.new, a.repeats)
            for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                row[k.replace("tokens_per_s", "ratio")] = row["ours"][k] / row["peer"][k]
            row["agree"] = _agree(row["ours"].pop("tokens"), row["peer"].pop("tokens"))
        else:
            row["ours"].pop("tokens")
        out["cases"][case] = row
        print(_case_line(case, row), flush=True)
    if os.path.isdir(a.mtp_checkpoint):
        out["mtp"] = mtp(a.mtp_checkpoint, a.mtp_prompts, a.mtp_prompt_tokens, a.new, a.mtp_repeats)
        print(_mtp_text(out["mtp"]), flush=True)
    else:
        print(f"(no {a.mtp_checkpoint}/: run `python train.py` first for the MTP part)")
    if a.json:
        print(json.dumps(out))


def _case_line(case: str, row: dict) -> str:
    o = row["ours"]
    line = (f"{case:>7}: ours prefill {o['prefill_tokens_per_s']:9.0f} tok/s, decode {o['decode_tokens_per_s']:8.1f} "
            f"tok/s")
    if "peer" in row:
        pr = row["peer"]
        line += (f" | peer prefill {pr['prefill_tokens_per_s']:8.0f}, decode {pr['decode_tokens_per_s']:6.1f} | "
                 f"ratio prefill {row['prefill_ratio']:.2f}x, decode {row['decode_ratio']:.2f}x | "
                 f"greedy agree {row['agree']} tokens")
    return line


def _mtp_text(m: dict) -> str:
    lines = [f"MTP on {m['checkpoint']} ({m['prompts']} held-out prompts of {m['prompt_tokens']} tokens, "
             f"median of {m['repeats']}):"]
    for k, r in m.items():
        if k.startswith("batch"):
            lo, hi = r["speedup_range"]
            lines.append(f"  {k}: plain {r['plain_tokens_per_s']:.0f} tok/s, mtp {r['mtp_tokens_per_s']:.0f} tok/s "
                         f"-> {r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}x); acceptance {r['acceptance_rate']:.0%}, "
                         f"{r['accepted_per_step']:.2f} tokens/step; identical: {r['identical']}")
    lines.append(f"  sample: {m['batch1']['sample']!r}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
