"""What `infer.py` runs: flags -> load -> generate -> stream text (and one JSON line with --json).

Bad input (an empty prompt, one longer than the context, an id outside the vocabulary, a directory
of unknown layout) ends with one line on stderr and exit status 1; a --kv_cache outside its choices, with
one line and status 2 (a usage error, as argparse ends one).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys

import jax
from absl import flags, logging

from dsv3_jax.data.tokenizer import load_tokenizer
from dsv3_jax.infer.engine import (
    GenerateConfig,
    GenerationError,
    Result,
    cache_bytes_per_token,
    generate,
    resolve_cache_dtype,
    use_decode_xla_flags,
)
from dsv3_jax.infer.sampling import Sampling
from dsv3_jax.infer.weights import WEIGHTS, CheckpointError, load_checkpoint, runtime_for, weight_bytes
from dsv3_jax.layers.cache import FP8
from dsv3_jax.runtime import choices

# --kv_cache -> the engine's cache dtype (unset: the compute dtype, which --weights sets).
KV_CACHES = {"bf16": "bfloat16", "fp8": FP8}
# --index_cache -> the dtype of a DSA indexer's cached keys (unset: as the latent cache; bf16 where it is fp8).
INDEX_CACHES = {"fp32": "float32", "bf16": "bfloat16"}


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "a training workdir, an export directory or a Hugging Face directory")
    flags.DEFINE_multi_string("prompt", [], "a prompt (repeat for a batch)")
    flags.DEFINE_string("prompts_file", None, "a file with one prompt per line (blank lines skipped)")
    flags.DEFINE_multi_string("prompt_ids", [], "a prompt as comma-separated token ids (repeatable)")
    flags.DEFINE_string("tokenizer", None, "'byte' or a tokenizer.json (default: the checkpoint's own)")
    flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate per prompt, at most")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy")
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
    flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0 = all)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_enum("speculative", "none", ["none", "mtp"], "MTP speculative decoding")
    flags.DEFINE_bool("compare_plain", True, "with --speculative=mtp, also decode plainly and report the speed-up")
    flags.DEFINE_enum("weights", "fp32", list(WEIGHTS), "weight precision in memory (fp8: E4M3, 128x128 scales)")
    flags.DEFINE_integer("steps_per_call", 8, "decode steps per call into the compiled program (the text streams "
                         "a chunk at a time)")
    flags.DEFINE_enum("experts", "auto", list(choices("experts")),
                      "how the routed experts run (all compute the same function): auto picks per platform and shape")
    flags.DEFINE_enum("attention", "auto", list(choices("attention")),
                      "how MLA attends (all compute the same function): auto picks per platform and shape")
    # A string, not an enum, so that a bad value ends with one line (absl's enum error is two, and status 1).
    flags.DEFINE_string("kv_cache", None, "how the latent KV cache stores tokens: bf16, or fp8 (FlashMLA's packed "
                        "rows: E4M3 latent with a float32 scale per 128 values, bf16 rope key; 656 bytes a token "
                        "and layer for V3 against 1152); default: the compute dtype")
    flags.DEFINE_string("index_cache", None, "how a DSA model (V3.2) caches its indexer's keys: fp32 or bf16 (half "
                        "the bytes each decode step scores); default: as --kv_cache, bf16 where that is fp8")
    flags.DEFINE_bool("json", False, "print one JSON object with the results as the last line")


class _Stream:
    """Prints a row's text as its tokens arrive, prompt first (echoed when the first tokens come, so
    after the prompt was accepted), holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, eos_id, prompt: list[int] | tuple[int, ...] = ()):
        self.tok, self.eos, self.ids, self.shown = tokenizer, eos_id, [t for t in prompt if t != eos_id], ""

    def __call__(self, row: int, new: list[int]) -> None:
        self.ids.extend(t for t in new if t != self.eos)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if text.startswith(self.shown) and len(text) > len(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def _prompts(f, tokenizer) -> tuple[list[list[int]], list[str]]:
    texts = list(f.prompt)
    if f.prompts_file:
        try:
            with open(f.prompts_file, encoding="utf-8") as fh:
                texts += [line.rstrip("\n") for line in fh if line.strip()]
        except OSError as e:
            raise GenerationError(f"--prompts_file: {e}") from e
        except UnicodeDecodeError as e:
            raise GenerationError(f"--prompts_file {f.prompts_file}: not UTF-8 text (byte {e.start}: "
                                  f"{e.reason})") from None
    ids = [tokenizer.encode(t) for t in texts]
    for spec in f.prompt_ids:
        try:
            ids.append([int(x) for x in spec.split(",") if x.strip()])
        except ValueError:
            raise GenerationError(f"--prompt_ids={spec!r}: expected comma-separated integers") from None
        texts.append(None)
    if not ids:
        raise GenerationError("give a prompt: --prompt, --prompts_file or --prompt_ids")
    return ids, texts


def _decode(tokenizer, ids: list[int], eos_id) -> str:
    return tokenizer.decode([t for t in ids if t != eos_id])


def _summary(res: Result, texts: list[str], cfg, cache_dtype, variables, prompts, rt, index_dtype=None) -> dict:
    out = {"text": texts[0] if len(texts) == 1 else texts,
           "tokens": res.tokens[0] if len(res.tokens) == 1 else res.tokens,
           "tokens_per_s": res.tokens_per_s, "prefill_s": res.prefill_s, "decode_s": res.decode_s,
           "compile_s": res.compile_s, "prefill_tokens_per_s": sum(map(len, prompts)) / res.prefill_s,
           "kv_cache": str(cache_dtype),
           "kv_cache_bytes_per_token": cache_bytes_per_token(cfg, cache_dtype, rt, index_dtype),
           "weight_bytes": weight_bytes(variables), "batch": len(prompts)}
    if res.acceptance_rate is not None:
        out.update(acceptance_rate=res.acceptance_rate, accepted_per_step=res.accepted_per_step)
    return out


# Each numeric flag of infer.py -> (its rule, as told to the user; whether a value keeps it).
FLAG_RULES = {
    "max_new_tokens": (">= 1", lambda v: v >= 1),
    "temperature": ("a finite number >= 0 (0: greedy)", lambda v: math.isfinite(v) and v >= 0),
    "top_p": ("in (0, 1]", lambda v: 0 < v <= 1),
    "top_k": (">= 0 (0: all)", lambda v: v >= 0),
    "steps_per_call": (">= 1", lambda v: v >= 1),
}


def check_flags(f) -> None:
    """Refuse a nonsensical numeric flag before the checkpoint is loaded."""
    for name, (rule, ok) in FLAG_RULES.items():
        value = getattr(f, name)
        if not ok(value):
            raise GenerationError(f"--{name} must be {rule}, got {value}")


def run(f) -> dict:
    check_flags(f)
    cfg, variables, tok_spec = load_checkpoint(f.checkpoint, f.weights)
    try:
        rt = runtime_for(f.weights, experts=f.experts, attention=f.attention)
    except ValueError as e:
        raise GenerationError(str(e)) from e
    spec = f.tokenizer or tok_spec
    if spec is None:
        raise GenerationError(f"--checkpoint {f.checkpoint} names no tokenizer: pass --tokenizer")
    try:
        tokenizer = load_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        raise GenerationError(f"--tokenizer: {e}") from e
    prompts, _ = _prompts(f, tokenizer)
    try:
        sampling = Sampling(f.temperature, f.top_k, f.top_p, vocab_limit=min(tokenizer.vocab_size, cfg.vocab_size))
    except ValueError as e:
        raise GenerationError(f"--{e}") from e
    gen = GenerateConfig(f.max_new_tokens, sampling, f.speculative, tokenizer.eos_id, f.seed, f.steps_per_call)
    stream = _Stream(tokenizer, tokenizer.eos_id, prompts[0]) if len(prompts) == 1 else None
    cache_dtype = resolve_cache_dtype(KV_CACHES.get(f.kv_cache), rt)
    index_dtype = INDEX_CACHES.get(f.index_cache)
    res = generate(cfg, variables, prompts, gen, on_tokens=stream, cache_dtype=cache_dtype, runtime=rt,
                   index_dtype=index_dtype)
    texts = [_decode(tokenizer, ids, tokenizer.eos_id) for ids in res.tokens]
    if stream is None:
        for i, ids in enumerate(res.tokens):  # each with its prompt
            print(f"[{i}] {_decode(tokenizer, prompts[i] + ids, tokenizer.eos_id)}")
    else:
        print()
    out = {**_summary(res, texts, cfg, cache_dtype, variables, prompts, rt, index_dtype), "weights": f.weights}
    if f.speculative == "mtp" and f.compare_plain:
        plain = generate(cfg, variables, prompts, dataclasses.replace(gen, speculative="none"), cache_dtype=cache_dtype,
                         runtime=rt, index_dtype=index_dtype)
        out.update(plain_tokens_per_s=plain.tokens_per_s,
                   speedup=res.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s else None,
                   same_as_plain=plain.tokens == res.tokens)
    return out


def main(argv, f) -> None:
    if len(argv) > 1:
        sys.exit(f"infer.py: unexpected arguments {argv[1:]}")
    if f.kv_cache is not None and f.kv_cache not in KV_CACHES:
        print(f"infer.py: --kv_cache={f.kv_cache!r}: expected one of {', '.join(KV_CACHES)} (unset: the compute "
              "dtype)", file=sys.stderr)
        sys.exit(2)
    if f.index_cache is not None and f.index_cache not in INDEX_CACHES:
        print(f"infer.py: --index_cache={f.index_cache!r}: expected one of {', '.join(INDEX_CACHES)} (unset: as "
              "--kv_cache)", file=sys.stderr)
        sys.exit(2)
    if not f.checkpoint:
        sys.exit("infer.py: --checkpoint is required")
    if not f["verbosity"].present:  # orbax logs every restore at INFO
        logging.set_verbosity(logging.WARNING)
    use_decode_xla_flags()  # before jax's first computation
    try:
        out = run(f)
    except (GenerationError, CheckpointError) as e:
        sys.exit(f"infer.py: {e}")
    if f.json:
        print(json.dumps(out))
    else:
        rate = f", acceptance {out['acceptance_rate']:.0%}" if "acceptance_rate" in out else ""
        speed = f", {out['speedup']:.2f}x plain decoding" if out.get("speedup") else ""
        print(f"-- {out['tokens_per_s']:.1f} tokens/s decode{rate}{speed}; prefill {out['prefill_s']:.3f} s; "
              f"cache {out['kv_cache_bytes_per_token']} B/token; weights {out['weight_bytes'] / 2**20:.1f} MiB "
              f"({f.weights}) on {jax.default_backend()}", file=sys.stderr)
