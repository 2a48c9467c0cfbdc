"""Generation over the latent KV cache: prefill, then fixed-shape decode steps, plain or MTP-speculative.

The cache holds, per layer and token, only the normalised KV latent and the rotated rope key
(kv_lora_rank + qk_rope_head_dim values: 576 for V3), and attention reads it through the absorbed
MLA path. With cache dtype "fp8" (`layers.cache.FP8`) each token's row is stored packed as it is written
(E4M3 latent with a float32 scale per 128 values, bfloat16 rope key: 656 bytes for V3 against 1,152 in
bfloat16), in prefill, decode and the MTP modules' caches alike, and every attention path reads it so.
Every row of a batch has its own length: prompts of different lengths share one padded prefill, and
each row then decodes at its own position and stops at its own EOS.

One step function serves both modes. A step feeds the main model the newest token plus the D
tokens the MTP modules drafted after it (D = 0 for plain decoding), at the row's positions n..n+D:
- verify: the main model's distribution at each of those positions (one forward);
- accept: draft j is kept with probability min(1, p(d_j) / q(d_j)) while all before it were kept
  (speculative sampling, Leviathan et al. 2023); after the first refusal the next token is drawn
  from max(0, p - q) renormalised, and after D acceptances from p itself. The output distribution
  is the main model's, and under greedy (one-hot p and q) the output is plain greedy decoding;
- draft: the MTP chain runs over the same window and drafts the next D tokens at the last kept
  position. Rejected drafts need no undo in either cache: the next window starts right after the
  last kept token and overwrites those slots before any query can read them.

Depth k > 0 of the MTP chain sees, at the last kept position, tokens that are themselves drafts,
and keeps that state in its cache; this costs draft quality only (V3 has depth 1, exact).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.sampling import Sampling, draw, greedy, log_probs
from dsv3_jax.layers import cache as latent_cache
from dsv3_jax.layers.cache import LatentCache
from dsv3_jax.model import Transformer
from dsv3_jax.ops import dispatch
from dsv3_jax.runtime import Runtime

PREFILL_BUCKET = 64  # prompts are padded to a multiple of this: one compilation per bucket, not per length
CACHE_BUCKET = 64
# XLA:CPU's concurrency-optimised scheduler orders a program's operations for parallel execution, and
# the thunk executor then hands the ready ones to other threads. A decode step is ~100-300 operations
# of a few microseconds each, for which the hand-offs cost more than the work: in program order the
# step runs faster (measured, interleaved: tiny batch 1 1.53x, small batch 8 1.23x, small batch 1
# 1.08x; docs/PERFORMANCE.md). XLA reads this flag once per process, from XLA_FLAGS only (a jit's
# compiler_options leave it unread), so the inference entry points set it before jax starts.
DECODE_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


class GenerationError(ValueError):
    """Bad input to generation (empty prompt, too long, ids outside the vocabulary...)."""


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 64
    sampling: Sampling = Sampling()
    speculative: str = "none"  # "none" | "mtp"
    eos_id: int | None = None
    seed: int = 0
    # Decode steps per call into the compiled program (a loop on the device that stops early once every
    # row is done): the host round trip per call (~0.3 ms on CPU) is paid once per chunk, and tokens
    # stream to the caller a chunk at a time.
    steps_per_call: int = 8

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.steps_per_call < 1:
            raise GenerationError(f"steps_per_call must be >= 1, got {self.steps_per_call}")
        if self.speculative not in ("none", "mtp"):
            raise GenerationError(f"speculative must be 'none' or 'mtp', got {self.speculative!r}")


class State(NamedTuple):
    cache: tuple[LatentCache, ...]  # per layer: S slots per row
    mtp_cache: tuple[LatentCache, ...]  # per MTP depth
    last: jax.Array  # [B] the newest token, not yet in the main cache
    length: jax.Array  # [B] tokens in the main cache = the position of `last`
    drafts: jax.Array  # [B, D] tokens drafted after `last`
    draft_logp: jax.Array  # [B, D, V] the distributions they were drawn from ([B, D, 1] unused if greedy)
    generated: jax.Array  # [B] tokens emitted so far
    done: jax.Array  # [B] EOS emitted or max_new_tokens reached
    key: jax.Array


def unpack_step(out: np.ndarray) -> tuple[np.ndarray, ...]:
    """A step's one int32 output [B, D+5] -> tokens [B, D+1] emitted (the first `count` of each row
    are real), count [B], drafts accepted [B] (before EOS or length truncation), active [B] (the row
    was still generating at the start of the step), done [B] (at its end). A call returns one such
    output per step it ran, [N, B, D+5] (one device-to-host copy per call); steps it did not run
    (every row was done) are all zeros, no row active."""
    return out[:, :-4], out[:, -4], out[:, -3], out[:, -2].astype(bool), out[:, -1].astype(bool)


@dataclasses.dataclass
class Result:
    tokens: list[list[int]]  # generated ids per prompt, EOS included when produced
    prefill_s: float
    decode_s: float
    compile_s: float
    steps: int
    drafted: int  # draft tokens proposed to active rows
    accepted: int  # of those, accepted
    row_steps: int = 0  # sum over steps of the rows active in the step

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first of each row (the prefill yields the first) per second."""
        return max(self.new_tokens - len(self.tokens), 0) / self.decode_s if self.decode_s else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def accepted_per_step(self) -> float | None:
        """Tokens per main-model forward in decoding (1 + accepted drafts, averaged over active rows)."""
        return None if not self.row_steps else (self.new_tokens - len(self.tokens)) / self.row_steps


def _rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, W, ...], idx [B] -> x[b, idx[b]]."""
    return x[jnp.arange(x.shape[0]), idx]


class Generator:
    """Jitted prefill and step functions for one model, batch size and cache length."""

    def __init__(self, cfg: ModelConfig, gen: GenerateConfig, cache_dtype=None, runtime: Runtime = Runtime(),
                 index_dtype=None):
        self.cfg, self.gen = cfg, gen
        self.depth = cfg.mtp_depth if gen.speculative == "mtp" else 0
        if gen.speculative == "mtp" and not cfg.mtp_depth:
            raise GenerationError("--speculative=mtp needs MTP modules, and this model has none (mtp_depth 0)")
        self.model = Transformer(cfg, runtime)
        self.runtime = runtime
        self.greedy = gen.sampling.temperature == 0
        self.cache_dtype = resolve_cache_dtype(cache_dtype, runtime)
        self.index_dtype = resolve_index_dtype(index_dtype, self.cache_dtype)  # a DSA indexer's cached keys
        self.prefill = jax.jit(self._prefill, static_argnums=3)
        self.step = jax.jit(self._steps, donate_argnums=1)
        self._compiled = {}  # signature of the arguments -> the AOT prefill, or True for a compiled step
        # TPU lays a [B*S, 576] array out with B*S minor (576 is not a whole number of 128-lane tiles), while the
        # decode loop and the latent-decode kernel read cache rows: each call of an unpinned step copied every
        # cache to row-major and back, and held the copy (docs/PERFORMANCE.md, "TPU kernels").
        self.pin_rows = dispatch.platform(runtime) == "tpu"
        self._pinned = {}  # (signature, shardings) -> the step jitted with the caches' rows pinned

    def compiled_prefill(self, variables, tokens, lengths, cache_len: int):
        """The prefill compiled ahead of time for these argument shapes (once per Generator), so that
        its compilation is timed apart from its run -> (executable, whether it was compiled now)."""
        key = ("prefill", cache_len, _signature((variables, tokens, lengths)))
        fresh = key not in self._compiled
        if fresh:
            self._compiled[key] = self.prefill.lower(variables, tokens, lengths, cache_len).compile()
        return self._compiled[key], fresh

    def compile_step(self, variables, state: State) -> None:
        """Compile the step for these argument shapes, if not yet, on a throwaway copy of the state.
        The step itself is called through jit's C++ dispatch, several times faster per call than an
        AOT `Compiled` object's Python path (it matters at a fraction of a millisecond per token)."""
        key = ("step", _signature((variables, state)))
        if key not in self._compiled:
            jax.block_until_ready(self.step_for(variables, state)(variables, jax.tree.map(jnp.copy, state)))
            self._compiled[key] = True

    def step_for(self, variables, state: State):
        """The jitted step for these arguments: `step`, or with `pin_rows` (TPU targets) the same function with
        every cache's rows (and indexer keys) row-major at its entry and exit (`step_formats`). The arguments'
        shardings must be concrete (arrays, or ShapeDtypeStructs that carry them); the state must be in those
        formats (`to_step_layout`)."""
        if not self.pin_rows:
            return self.step
        shardings = tuple(x.sharding for x in jax.tree.leaves((variables, state)))
        key = (_signature((variables, state)), shardings)
        if key not in self._pinned:
            formats = step_formats(state)
            some_cache = next(x.rows.sharding for x in state.cache)
            whole = jax.sharding.NamedSharding(some_cache.mesh, jax.sharding.PartitionSpec()) \
                if isinstance(some_cache, jax.sharding.NamedSharding) else some_cache
            self._pinned[key] = jax.jit(self._steps, donate_argnums=1,
                                        in_shardings=(jax.tree.map(lambda x: x.sharding, variables), formats),
                                        out_shardings=(formats, whole))
        return self._pinned[key]

    def to_step_layout(self, state: State) -> State:
        """The state as `step_for`'s step takes it: with `pin_rows`, the caches' rows moved to row-major (once
        per generation, after the prefill); else as it is."""
        return jax.device_put(state, step_formats(state)) if self.pin_rows else state

    # -- the pieces, traced once per shape ------------------------------------------------------

    def _empty_cache(self, batch: int, length: int, n: int) -> tuple[LatentCache, ...]:
        """n layers' caches; with a DSA indexer each also holds the indexer's keys, in `index_dtype`."""
        c = self.cfg
        index_dim = c.index_head_dim if c.has_indexer else 0
        return tuple(LatentCache.empty(batch, length, c.kv_cache_dim, self.cache_dtype, c.kv_lora_rank, index_dim,
                                       self.index_dtype) for _ in range(n))

    def _draft(self, variables, mtp_cache, h, ext, positions, at, key):
        """The MTP chain over a window: h [B,W,D] main hidden at `positions` [B,W]; ext [B, W+D+1] the
        tokens at those positions onwards, known up to index at+1. Drafts D tokens after at+1."""
        rows, w = jnp.arange(h.shape[0]), positions.shape[1]
        drafts, logps, caches = [], [], []
        for k in range(self.depth):
            nxt = ext[:, k + 1: k + 1 + w]
            logits, h, cache = self.model.apply(variables, k, h, nxt, positions, mtp_cache[k], at,
                                                method=Transformer.mtp_step)
            logits = logits[:, 0]  # [B, V] at the last kept position
            if self.greedy:  # drafts are argmaxes; their distributions are never needed
                d, logp = greedy(logits, self.gen.sampling), jnp.zeros((h.shape[0], 1))
            else:
                logp = log_probs(logits, self.gen.sampling)
                key, sub = jax.random.split(key)
                d = draw(sub, logp)
            ext = ext.at[rows, at + k + 2].set(d)
            drafts.append(d), logps.append(logp), caches.append(cache)
        b, v = h.shape[0], 1 if self.greedy else self.cfg.vocab_size
        if not drafts:
            return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0, v), jnp.float32), ()
        return jnp.stack(drafts, 1), jnp.stack(logps, 1), tuple(caches)

    def _prefill(self, variables, tokens, lengths, cache_len: int):
        """tokens [B,T] right-padded, lengths [B] -> (State, first generated token [B])."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cache = self._empty_cache(b, cache_len, self.cfg.num_layers)
        at = lengths - 1
        # positions are 0..T-1 in every row: the attention may skip keys past each query block
        logits, h, cache = self.model.apply(variables, tokens, positions, cache, at, True, method=Transformer.step)
        key, k1, k2 = jax.random.split(jax.random.PRNGKey(self.gen.seed), 3)
        first = draw(k1, log_probs(logits[:, 0], self.gen.sampling))
        ext = jnp.pad(tokens, ((0, 0), (0, self.depth + 1))).at[jnp.arange(b), lengths].set(first)
        drafts, draft_logp, mtp_cache = self._draft(variables, self._empty_cache(b, cache_len, self.depth), h, ext,
                                                    positions, at, k2)
        done = jnp.full((b,), self.gen.max_new_tokens <= 1)
        if self.gen.eos_id is not None:
            done |= first == self.gen.eos_id
        state = State(cache, mtp_cache, first, lengths, drafts, draft_logp, jnp.ones((b,), jnp.int32), done, key)
        return state, first

    def _accept(self, p, drafts, draft_logp, key):
        """p [B,D+1,V] target log-probs at the window -> (accepted count [B], next token [B])."""
        b, d = drafts.shape
        k1, k2 = jax.random.split(key)
        if d == 0:
            return jnp.zeros((b,), jnp.int32), draw(k2, p[:, 0])
        p_d = jnp.take_along_axis(p[:, :d], drafts[..., None], -1)[..., 0]
        q_d = jnp.take_along_axis(draft_logp, drafts[..., None], -1)[..., 0]
        ok = jnp.log(jax.random.uniform(k1, (b, d))) < p_d - q_d  # probability min(1, p/q)
        a = jnp.cumprod(ok, axis=1).sum(1).astype(jnp.int32)
        p_a = jnp.exp(_rows(p, a))
        q_next = jnp.exp(_rows(draft_logp, jnp.minimum(a, d - 1)))
        residual = jnp.where((a < d)[:, None], jnp.maximum(p_a - q_next, 0.0), p_a)
        # p == q gives no residual mass, but then the draft is never refused; guard the rounding case.
        residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_a)
        return a, draw(k2, jnp.log(residual))

    def _truncate(self, state: State, emitted, a):
        """How many of this step's emitted tokens [B,D+1] count, given EOS and max_new_tokens."""
        count = jnp.minimum(a + 1, self.gen.max_new_tokens - state.generated)
        idx = jnp.arange(emitted.shape[1])
        if self.gen.eos_id is not None:
            eos = (emitted == self.gen.eos_id) & (idx < count[:, None])
            count = jnp.where(eos.any(1), jnp.argmax(eos, axis=1) + 1, count)
        else:
            eos = jnp.zeros(emitted.shape, bool)
        count = jnp.where(state.done, 0, count)
        done = state.done | eos.any(1) | (state.generated + count >= self.gen.max_new_tokens)
        return count.astype(jnp.int32), done

    def _step(self, variables, state: State):
        b, d = state.drafts.shape
        rows = jnp.arange(b)
        window = jnp.concatenate([state.last[:, None], state.drafts], axis=1)  # [B, D+1]
        positions = state.length[:, None] + jnp.arange(d + 1, dtype=jnp.int32)
        logits, h, cache = self.model.apply(variables, window, positions, state.cache, method=Transformer.step)
        key, k_acc, k_draft = jax.random.split(state.key, 3)
        if self.greedy:  # the rejection rule with one-hot p and q: keep drafts while they are the argmax
            target = greedy(logits, self.gen.sampling)  # [B, D+1]
            a = jnp.cumprod(state.drafts == target[:, :d], axis=1).sum(1).astype(jnp.int32)
            nxt = _rows(target, a)
        else:
            a, nxt = self._accept(log_probs(logits, self.gen.sampling), state.drafts, state.draft_logp, k_acc)
        emitted = jnp.concatenate([state.drafts, jnp.zeros((b, 1), jnp.int32)], axis=1).at[rows, a].set(nxt)
        count, done = self._truncate(state, emitted, a)
        ext = jnp.pad(window, ((0, 0), (0, d + 1))).at[rows, a + 1].set(nxt)
        drafts, draft_logp, mtp_cache = self._draft(variables, state.mtp_cache, h, ext, positions, a, k_draft)
        keep = lambda new, old: jnp.where(state.done.reshape(-1, *([1] * (old.ndim - 1))), old, new)
        new = State(cache, mtp_cache, keep(nxt, state.last), keep(state.length + a + 1, state.length),
                    keep(drafts, state.drafts), keep(draft_logp, state.draft_logp), state.generated + count, done, key)
        return new, jnp.concatenate([emitted, jnp.stack([count, a, ~state.done, done], 1).astype(jnp.int32)], 1)


    def _steps(self, variables, state: State):
        """Up to `steps_per_call` steps, stopping once every row is done -> (state, outputs [N, B, D+5])."""
        n, (b, d) = self.gen.steps_per_call, state.drafts.shape

        def body(carry):
            i, st, out = carry
            st, o = self._step(variables, st)
            return i + 1, st, out.at[i].set(o)

        carry = (0, state, jnp.zeros((n, b, d + 5), jnp.int32))
        _, state, out = jax.lax.while_loop(lambda c: (c[0] < n) & ~c[1].done.all(), body, carry)
        return state, out


def use_decode_xla_flags(environ=os.environ) -> None:
    """Add DECODE_XLA_FLAGS to XLA_FLAGS, leaving any flag the user set there as it is. Takes effect
    only if called before jax's first computation in the process (XLA parses XLA_FLAGS once)."""
    current = environ.get("XLA_FLAGS", "").split()
    named = {f.split("=", 1)[0] for f in current}
    extra = [f for f in DECODE_XLA_FLAGS if f.split("=", 1)[0] not in named]
    if extra:
        environ["XLA_FLAGS"] = " ".join(current + extra)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def validate_prompts(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise GenerationError("no prompt given")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i}: token id {bad[0]} is outside the model's vocabulary "
                                  f"(0..{cfg.vocab_size - 1})")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            room = cfg.max_position_embeddings - len(p)
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it would pass the "
                f"model's context of {cfg.max_position_embeddings} tokens"
                + (f" (at most {room} new tokens fit)" if room > 0 else " (the prompt alone does not fit)"))


def pad_prompts(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens [B, T] (T a multiple of PREFILL_BUCKET) and lengths [B]."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), _round_up(int(lengths.max()), PREFILL_BUCKET)), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


def cache_length(cfg: ModelConfig, prompt_tokens: int, max_new_tokens: int, depth: int) -> int:
    """Slots per row: the padded prompt, the new tokens, and room for a last window of drafts."""
    return _round_up(max(prompt_tokens, max(prompt_tokens, 1) + max_new_tokens) + depth + 1, CACHE_BUCKET)


def generator(cfg: ModelConfig, gen: GenerateConfig, cache_dtype=None, runtime: Runtime = Runtime(),
              index_dtype=None) -> Generator:
    """A Generator per (model config, generation config, cache dtypes, runtime), kept across calls, so
    that calling `generate` again with the same settings and shapes compiles nothing."""
    # Every argument passed by position: lru_cache keys on the arguments as given, defaults left out.
    return _generator(cfg, gen, cache_dtype, runtime, None if index_dtype is None else jnp.dtype(index_dtype))


@functools.lru_cache(maxsize=8)
def _generator(cfg, gen, cache_dtype, runtime, index_dtype) -> Generator:
    return Generator(cfg, gen, cache_dtype, runtime, index_dtype)


generator.cache_clear = _generator.cache_clear  # forget every kept Generator (as lru_cache's own)


def step_formats(state: State) -> State:
    """`state`'s shardings, each cache's rows and indexer keys with a row-major layout (`Generator.step_for`)."""
    row_major = lambda x: Format(Layout(major_to_minor=tuple(range(x.ndim))), x.sharding)

    def leaf(x):
        if isinstance(x, LatentCache):
            index = None if x.index_keys is None else row_major(x.index_keys)
            return x.replace(rows=row_major(x.rows), index_keys=index)
        return x.sharding

    return jax.tree.map(leaf, state, is_leaf=lambda x: isinstance(x, LatentCache))


def _signature(tree) -> tuple:
    """What a compiled program depends on in its arguments: their tree and leaf shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves)


def generate(cfg: ModelConfig, variables: dict, prompts: list[list[int]], gen: GenerateConfig,
             on_tokens: Callable[[int, list[int]], None] | None = None, cache_dtype=None,
             warm_prefill: bool = False, runtime: Runtime = Runtime(), index_dtype=None) -> Result:
    """Generate for a batch of prompts (token ids). `on_tokens(row, new_ids)` is called as tokens
    arrive (streaming). Compilation is timed apart from prefill and decode, and happens once per
    settings and shapes (later calls reuse it); `warm_prefill` also runs the prefill once untimed
    first (an executable's first run pays one-time costs: benchmarks). `runtime`: how the model
    computes (`infer.weights.runtime_for` matches it to the weights' precision). `cache_dtype`: None (the
    compute dtype), a jnp dtype, or "fp8" (`layers.cache.FP8`: packed FP8 rows). `index_dtype`: a DSA indexer's
    cached keys (`resolve_index_dtype`)."""
    validate_prompts(cfg, prompts, gen.max_new_tokens)
    cache_dtype = None if cache_dtype is None else resolve_cache_dtype(cache_dtype, runtime)
    g = generator(cfg, gen, cache_dtype, runtime, index_dtype)
    variables = g.model.prepare_decode(variables)
    tokens, lengths = pad_prompts(prompts)
    s = cache_length(cfg, tokens.shape[1], gen.max_new_tokens, g.depth)
    t0 = time.perf_counter()
    prefill, _ = g.compiled_prefill(variables, tokens, lengths, s)
    if warm_prefill:
        jax.block_until_ready(prefill(variables, tokens, lengths))
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    state, first = prefill(variables, tokens, lengths)
    first = np.asarray(first)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = g.to_step_layout(state)
    g.compile_step(variables, state)
    step = g.step_for(variables, state)
    compile_s += time.perf_counter() - t0
    out = [[int(t)] for t in first]
    for i, t in enumerate(out):
        on_tokens and on_tokens(i, t)
    done = np.asarray(state.done)
    res = Result(out, prefill_s, 0.0, compile_s, 0, 0, 0)
    t0 = time.perf_counter()
    pending = None if done.all() else step(variables, state)
    while pending is not None:
        state, chunk = pending
        # The next call goes out before this one's tokens are read: the device runs it while the
        # host streams these. Once every row is done, that call's loop runs no step (a few us).
        pending = step(variables, state)
        if _take_chunk(np.asarray(chunk), g.depth, res, on_tokens):
            pending = None
    res.decode_s = time.perf_counter() - t0
    return res


def _take_chunk(chunk: np.ndarray, depth: int, res: Result, on_tokens) -> bool:
    """Append one call's outputs [N, B, D+5] to `res` (and stream them) -> whether every row is done."""
    done = False
    for o in chunk:
        toks, count, acc, active, step_done = unpack_step(o)
        if not active.any():  # a step the call did not run: every row was already done
            return True
        done = bool(step_done.all())
        res.steps += 1
        res.row_steps += int(active.sum())
        res.drafted += depth * int(active.sum())
        res.accepted += int(acc[active].sum())
        for i in np.flatnonzero(count):
            new = toks[i, : count[i]].tolist()
            res.tokens[i].extend(new)
            on_tokens and on_tokens(i, new)
    return done


def resolve_cache_dtype(cache_dtype, runtime: Runtime):
    """The cache dtype a Generator stores: "fp8" (packed rows), a jnp dtype, or None: the runtime's compute dtype."""
    if latent_cache.is_fp8(cache_dtype):
        return latent_cache.FP8
    return jnp.dtype(cache_dtype or runtime.dtype)


def resolve_index_dtype(index_dtype, cache_dtype):
    """The dtype a DSA indexer's cached keys are stored in: `index_dtype` (float32 or bfloat16), else as the
    latent cache (`layers.cache.index_dtype`)."""
    if index_dtype is None:
        return latent_cache.index_dtype(cache_dtype)
    if jnp.dtype(index_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise GenerationError(f"the indexer's key cache stores float32 or bfloat16, got {jnp.dtype(index_dtype)}")
    return jnp.dtype(index_dtype)


def cache_bytes_per_token(cfg: ModelConfig, cache_dtype, runtime: Runtime = Runtime(), index_dtype=None) -> int:
    """Bytes the main model's cache holds per token, all layers (the cost model's figure at this dtype; "fp8":
    packed rows, `layers.cache.row_bytes`), plus a DSA indexer's keys (`resolve_index_dtype`)."""
    cache_dtype = resolve_cache_dtype(cache_dtype, runtime)
    index = cfg.index_head_dim * resolve_index_dtype(index_dtype, cache_dtype).itemsize if cfg.has_indexer else 0
    return cfg.num_layers * (latent_cache.row_bytes(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cache_dtype) + index)
