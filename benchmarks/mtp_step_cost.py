"""What an MTP speculative step costs against a plain decode step, part by part (diagnostic).

Three step functions of the same engine, timed on the same random weights, interleaved:
  - plain: the main model on 1 position, then the next token;
  - verify only: the MTP step with its drafting replaced by a free copy (the main model on the
    window of 2 positions and the acceptance rule, no MTP block, no second head);
  - mtp: the whole MTP step (verify, then the MTP block over the window and its head).
The ceiling printed is the speed-up speculative decoding could reach at the given tokens per step
if drafting cost nothing: tokens_per_step * plain / verify_only. The MTP module's own cost comes on
top. A step's time is the call's time over the steps it ran (8 per call, as the engine runs them).

Usage: python benchmarks/mtp_step_cost.py [--config tiny] [--batch 1] [--repeats 7]
       [--tokens_per_step 1.98] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.engine import (
    GenerateConfig,
    Generator,
    cache_length,
    pad_prompts,
    use_decode_xla_flags,
)
from dsv3_jax.model import Transformer, init_variables

PROMPT_TOKENS = 64
CALLS = 16  # timed calls per measurement: 128 steps


class VerifyOnly(Generator):
    """The MTP step without its drafting: the next drafts are copies of the newest kept token."""

    def _draft(self, variables, mtp_cache, h, ext, positions, at, key):
        if not self.depth:
            return super()._draft(variables, mtp_cache, h, ext, positions, at, key)
        d = ext[jnp.arange(ext.shape[0]), at + 1]
        return jnp.tile(d[:, None], (1, self.depth)), jnp.zeros((h.shape[0], self.depth, 1)), tuple(mtp_cache)


def step_us(g: Generator, variables: dict, prompts: list[list[int]]) -> float:
    """One measurement: microseconds per decode step, over CALLS calls after a warm one."""
    tokens, lengths = pad_prompts(prompts)
    s = cache_length(g.cfg, tokens.shape[1], g.gen.max_new_tokens, g.depth)
    state, _ = g.prefill(variables, tokens, lengths, s)
    state, _ = g.step(variables, state)  # compiled on the first call; warm from the second
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(CALLS):
        state, out = g.step(variables, state)
    out = np.asarray(out)  # the last call's outputs: every step must have run
    assert out[:, :, -2].all(), "a row finished early: raise max_new_tokens"
    return (time.perf_counter() - t0) / (CALLS * g.gen.steps_per_call) * 1e6


def new_tokens(cfg: ModelConfig) -> int:
    """Enough new tokens that no row stops while timed: every call's steps at their most tokens."""
    return (CALLS + 1) * GenerateConfig().steps_per_call * (cfg.mtp_depth + 1) + 1


def measure(cfg: ModelConfig, batch: int, repeats: int) -> dict:
    # The absorbed attention weights derived once, as generate() does before it steps.
    variables = Transformer(cfg).prepare_decode(init_variables(cfg, jax.random.PRNGKey(0)))
    prompts = np.random.RandomState(0).randint(1, cfg.vocab_size, (batch, PROMPT_TOKENS)).tolist()
    room = new_tokens(cfg)
    gens = {"plain": Generator(cfg, GenerateConfig(max_new_tokens=room)),
            "verify_only": VerifyOnly(cfg, GenerateConfig(max_new_tokens=room, speculative="mtp")),
            "mtp": Generator(cfg, GenerateConfig(max_new_tokens=room, speculative="mtp"))}
    times = {k: [] for k in gens}
    for _ in range(repeats):  # interleaved, so a burst of load hits every variant alike
        for k, g in gens.items():
            times[k].append(step_us(g, variables, prompts))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens_per_step", type=float, default=1.98,
                   help="tokens an MTP step yields (1.98: the README's model at batch 1)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    use_decode_xla_flags()  # as infer.py runs; before jax's first computation
    cfg = ModelConfig.from_json(a.config)
    if not cfg.mtp_depth:
        raise SystemExit(f"{a.config} has no MTP modules (mtp_depth 0)")
    if cfg.max_position_embeddings < PROMPT_TOKENS + new_tokens(cfg):
        raise SystemExit(f"{a.config}'s context ({cfg.max_position_embeddings}) is too short for this benchmark")
    t = measure(cfg, a.batch, a.repeats)
    out = {"config": a.config, "batch": a.batch, "backend": jax.default_backend(), "step_us": t,
           "verify_over_plain": t["verify_only"] / t["plain"], "mtp_over_plain": t["mtp"] / t["plain"],
           "tokens_per_step": a.tokens_per_step,
           "ceiling_free_drafts": a.tokens_per_step * t["plain"] / t["verify_only"],
           "speedup_at_tokens_per_step": a.tokens_per_step * t["plain"] / t["mtp"]}
    print(f"{a.config}, batch {a.batch}, median of {a.repeats}: plain step {t['plain']:.0f} us, "
          f"verify only {t['verify_only']:.0f} us ({out['verify_over_plain']:.2f}x), "
          f"MTP step {t['mtp']:.0f} us ({out['mtp_over_plain']:.2f}x)")
    print(f"at {a.tokens_per_step} tokens per step: MTP {out['speedup_at_tokens_per_step']:.2f}x plain; "
          f"with drafting free it could reach {out['ceiling_free_drafts']:.2f}x")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
