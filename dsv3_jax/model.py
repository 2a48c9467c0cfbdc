"""The DeepSeek-V3 transformer: blocks, the main model and its multi-token-prediction modules.

Contract: `Transformer(cfg).apply(variables, tokens)` with int32 tokens [B, T] returns float32
logits [B, T, vocab]; with `return_mtp=True` it returns (logits, mtp_logits [depth, B, T, vocab]).
`variables` holds "params" and, for V3-style routers, "router" (the balancing biases).
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.cache import LatentCache
from dsv3_jax.layers.common import weight
from dsv3_jax.layers.mla import ABSORBED, MLA
from dsv3_jax.layers.mlp import MLP
from dsv3_jax.layers.moe import MoE
from dsv3_jax.layers.norm import RMSNorm
from dsv3_jax.ops import dispatch, remat
from dsv3_jax.ops.linear import linear
from dsv3_jax.parallel.rules import constrain
from dsv3_jax.runtime import Runtime

# Activations between blocks: rows over the batch mesh axes, sequence and model dims whole.
ACTIVATION_AXES = ("batch", "seq", "act_embed")


class Block(nn.Module):
    cfg: ModelConfig
    moe: bool
    runtime: Runtime = Runtime()

    def setup(self):
        c, rt = self.cfg, self.runtime
        self.attn_norm = RMSNorm(c.rms_norm_eps)
        self.attn = MLA(c, rt)
        self.ffn_norm = RMSNorm(c.rms_norm_eps)
        self.ffn = MoE(c, rt) if self.moe else MLP(c.hidden_size, c.intermediate_size, c.init_std, rt)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: LatentCache | None = None,
                 sorted_positions: bool = False):
        """-> x; or (x, updated cache) when given a latent cache (see MLA, also for sorted_positions)."""
        x = constrain(x, ACTIVATION_AXES)
        attn = self.attn(self.attn_norm(x), positions, cache, sorted_positions)
        if cache is not None:
            attn, cache = attn
        x = x + attn
        x = constrain(x + self.ffn(self.ffn_norm(x)), ACTIVATION_AXES)
        return x if cache is None else (x, cache)


def block(cfg: ModelConfig, moe: bool, runtime: Runtime, name: str | None = None) -> Block:
    """A Block, wrapped in `nn.remat` with the runtime's policy when it asks for rematerialisation.
    Parameter names and values are the same either way."""
    if not remat.enabled(runtime.remat):
        return Block(cfg, moe, runtime, name=name)
    # static_argnums counts self: 4 is sorted_positions, a Python bool.
    cls = nn.remat(Block, static_argnums=(4,), policy=dispatch.remat_policy(runtime))
    return cls(cfg, moe, runtime, name=name)


class ScanBody(Block):
    """A Block as the body of `nn.scan`: (x, positions, sorted_positions) -> (x, None)."""

    def __call__(self, x: jax.Array, positions: jax.Array, sorted_positions: bool = False):
        return super().__call__(x, positions, None, sorted_positions), None


# The scanned layout's stacks: the first_k_dense dense blocks, then the MoE blocks, each one module
# whose parameters carry a leading "layers" axis (`stack_layers` maps the per-layer layout to it).
DENSE_STACK, MOE_STACK = "dense_layers", "moe_layers"
SCANNED_COLLECTIONS = ("params", "router", "intermediates", ABSORBED)


def stacked_blocks(cfg: ModelConfig, moe: bool, runtime: Runtime, length: int, name: str):
    """`length` Blocks compiled once, as one `nn.scan` over stacked parameters (remat inside it)."""
    cls = ScanBody
    if remat.enabled(runtime.remat):
        # static_argnums counts self: 3 is sorted_positions. Inside a scan CSE cannot undo the remat.
        cls = nn.remat(ScanBody, static_argnums=(3,), policy=dispatch.remat_policy(runtime), prevent_cse=False)
    scanned = nn.scan(cls, variable_axes={c: 0 for c in SCANNED_COLLECTIONS}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=length,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, moe, runtime, name=name)


def stacks(cfg: ModelConfig) -> dict[str, range]:
    """The scanned layout's stacks and the layer indices each holds (empty stacks left out)."""
    out = {DENSE_STACK: range(0, cfg.first_k_dense), MOE_STACK: range(cfg.first_k_dense, cfg.num_layers)}
    return {name: layers for name, layers in out.items() if len(layers)}


class MTPModule(nn.Module):
    """One MTP depth (V3 report s.2.2): h'_i = M [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i)] -> block.

    The concatenation puts the embedding FIRST, as the released checkpoint's eh_proj expects.
    Returns the block output (input of the next depth) and its head-normed copy for the logits.
    """

    cfg: ModelConfig
    runtime: Runtime = Runtime()

    def setup(self):
        c = self.cfg
        self.enorm = RMSNorm(c.rms_norm_eps)
        self.hnorm = RMSNorm(c.rms_norm_eps)
        self.eh_proj = weight(self, "eh_proj", (2 * c.hidden_size, c.hidden_size), ("mtp_concat", "embed"),
                              c.init_std)
        self.block = block(c, c.n_routed_experts > 0, self.runtime)
        self.head_norm = RMSNorm(c.rms_norm_eps)

    def __call__(self, h: jax.Array, next_emb: jax.Array, positions: jax.Array, cache: LatentCache | None = None,
                 sorted_positions: bool = False):
        """-> (out, normed); with a latent cache, (out, normed, updated cache)."""
        # Kept in the activation dtype, never FP8 (the report keeps the MTP projection precise).
        x = linear(jnp.concatenate([self.enorm(next_emb), self.hnorm(h)], axis=-1), self.eh_proj)
        out = self.block(x, positions, cache, sorted_positions)
        if cache is not None:
            out, cache = out
            return out, self.head_norm(out), cache
        return out, self.head_norm(out)


def _pick(x: jax.Array, at: jax.Array | None) -> jax.Array:
    """x [B,T,...] -> x[b, at[b]] as [B,1,...]; all of x when `at` is None."""
    return x if at is None else x[jnp.arange(x.shape[0]), at][:, None]


def _shift_left(tokens: jax.Array, k: int) -> jax.Array:
    """tokens[:, i + k], zero-padded at the end; the padded positions carry no MTP target."""
    return jnp.pad(tokens[:, k:], ((0, 0), (0, k)))


class Transformer(nn.Module):
    cfg: ModelConfig
    runtime: Runtime = Runtime()

    def setup(self):
        c, rt = self.cfg, self.runtime
        emb_init = nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("vocab", "embed"))
        self.embed = self.param("embed", emb_init, (c.vocab_size, c.hidden_size), jnp.float32)
        if rt.scan_layers:
            self.stacks = [stacked_blocks(c, name == MOE_STACK, rt, len(layers), name)
                           for name, layers in stacks(c).items()]
        else:
            self.layers = [block(c, i >= c.first_k_dense, rt, name=f"layers_{i}") for i in range(c.num_layers)]
        self.final_norm = RMSNorm(c.rms_norm_eps)
        if not c.tie_word_embeddings:
            head_init = nn.with_logical_partitioning(nn.initializers.normal(c.init_std), ("embed", "vocab"))
            self.lm_head = self.param("lm_head", head_init, (c.hidden_size, c.vocab_size), jnp.float32)
        self.mtp = [MTPModule(c, rt, name=f"mtp_{k}") for k in range(c.mtp_depth)]

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed, tokens, axis=0).astype(self.runtime.compute_dtype)

    def head(self) -> jax.Array:
        """The output head's weight [D, V] (the embedding's transpose when tied)."""
        return self.embed.T if self.cfg.tie_word_embeddings else self.lm_head

    def logits(self, h: jax.Array) -> jax.Array:
        """The output head, kept in float32 (report s.3.3: the head stays in high precision)."""
        head = self.head()
        # As one [B*T, D] matmul: XLA:CPU lays out the 3-D form's backward far worse (transposes).
        flat = h.reshape(-1, h.shape[-1]).astype(jnp.float32)
        return (flat @ head).reshape(*h.shape[:-1], head.shape[-1])

    def hidden(self, tokens: jax.Array, positions: jax.Array, sorted_positions: bool = False) -> jax.Array:
        """[B, T] -> the last block's output [B, T, D], before the final norm."""
        x = self.embed_tokens(tokens)
        if self.runtime.scan_layers:
            for stack in self.stacks:
                x, _ = stack(x, positions, sorted_positions)
            return x
        for layer in self.layers:
            x = layer(x, positions, None, sorted_positions)
        return x

    def features(self, tokens: jax.Array, future: jax.Array | None = None):
        """Training's forward up to the head: (final-normed hidden [B,T,D], each MTP depth's normed
        output [depth,B,T,D], the head [D,V]); `__call__(tokens, return_mtp=True, future=future)` is
        their logits. The loss applies the head itself, in slices (ops.cross_entropy)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        h = self.hidden(tokens, positions, True)
        normed = self._mtp_normed(tokens, h, positions, future, True)
        mtp = jnp.stack(normed) if normed else jnp.zeros((0, *h.shape), h.dtype)
        return self.final_norm(h), mtp, self.head()

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, return_mtp: bool = False,
                 future: jax.Array | None = None):
        """`future` [B, T + depth] optionally supplies the tokens after the window, so that the MTP
        depths see real embeddings at the last positions instead of padding (training)."""
        # The default positions increase along the sequence: attention may skip masked key blocks.
        sorted_positions = positions is None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        h = self.hidden(tokens, positions, sorted_positions)
        logits = self.logits(self.final_norm(h))
        if not return_mtp:
            if self.is_initializing():  # create the MTP parameters too
                self.mtp_logits(tokens, h, positions, future, sorted_positions)
            return logits
        return logits, self.mtp_logits(tokens, h, positions, future, sorted_positions)

    def _per_layer(self) -> list:
        if self.runtime.scan_layers:
            raise ValueError("decoding runs the per-layer layout: Runtime(scan_layers=False), with the "
                             "variables passed through unstack_layers")
        return self.layers

    def step(self, tokens: jax.Array, positions: jax.Array, cache: tuple[LatentCache, ...],
             logits_at: jax.Array | None = None, sorted_positions: bool = False):
        """Inference over a latent cache: tokens [B,T] at contiguous positions [B,T] (each row its own
        start), one LatentCache per layer.
        -> (logits [B,T,V], last hidden [B,T,D], new cache).
        `logits_at` [B]: the head runs only at that index of each row (prefill), logits [B,1,V].
        `sorted_positions`: the caller vouches that every row's positions are 0..T-1 (a prefill from an empty
        cache), so attention may skip the keys past each query block (MLA)."""
        x, new = self.embed_tokens(tokens), []
        for layer, layer_cache in zip(self._per_layer(), cache, strict=True):
            x, layer_cache = layer(x, positions, layer_cache, sorted_positions)
            new.append(layer_cache)
        return self.logits(self.final_norm(_pick(x, logits_at))), x, tuple(new)

    def mtp_step(self, depth: int, h: jax.Array, next_tokens: jax.Array, positions: jax.Array, cache: LatentCache,
                 logits_at: jax.Array | None = None):
        """MTP depth `depth` (0-based) over a latent cache, for drafting: h [B,T,D] is the previous
        depth's output (the main model's for depth 0) at `positions`, next_tokens [B,T] the tokens
        one step after those positions. -> (logits [B,T,V] for the token after next, out, cache);
        `logits_at` as in `step`."""
        out, normed, cache = self.mtp[depth](h, self.embed_tokens(next_tokens), positions, cache)
        return self.logits(_pick(normed, logits_at)), out, cache

    def mtp_logits(self, tokens: jax.Array, h: jax.Array, positions: jax.Array,
                   future: jax.Array | None = None, sorted_positions: bool = False) -> jax.Array:
        """[depth, B, T, vocab]: depth k (1-based) at position i predicts token i + k + 1."""
        out = [self.logits(n) for n in self._mtp_normed(tokens, h, positions, future, sorted_positions)]
        if not out:
            return jnp.zeros((0, *tokens.shape, self.cfg.vocab_size), jnp.float32)
        return jnp.stack(out)

    def _mtp_normed(self, tokens, h, positions, future, sorted_positions) -> list[jax.Array]:
        """Each MTP depth's head-normed output [B, T, D], the depths chained."""
        out, t = [], tokens.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            nxt = _shift_left(tokens, k) if future is None else future[:, k: k + t]
            h, normed = module(h, self.embed_tokens(nxt), positions, None, sorted_positions)
            out.append(normed)
        return out


    def _absorb(self) -> None:
        for block in [*self._per_layer(), *(m.block for m in self.mtp)]:
            block.attn.absorb()

    def prepare_decode(self, variables: dict) -> dict:
        """`variables` plus what decoding derives once from the weights instead of on every step:
        each attention layer's wkv_b split into its absorbed halves (the ABSORBED collection)."""
        _, derived = self.apply(variables, method=Transformer._absorb, mutable=[ABSORBED])
        return {**variables, ABSORBED: derived[ABSORBED]}


_LAYER_KEY = re.compile(r"layers_(\d+)$")


def _has_layers(node) -> bool:
    return isinstance(node, dict) and any(isinstance(k, str) and _LAYER_KEY.match(k) for k in node)


def _has_stacks(node) -> bool:
    return isinstance(node, dict) and (DENSE_STACK in node or MOE_STACK in node)


def _stack(leaves):
    xp = np if all(isinstance(x, np.ndarray) for x in leaves) else jnp
    return xp.stack(leaves)


def stack_layers(tree, cfg: ModelConfig):
    """Per-layer layout -> scanned layout, in any tree that mirrors the variables (variables, one of
    their collections, gradients, optimizer moments): each dict's "layers_i" entries become the
    `stacks(cfg)` entries, leaves stacked on a new leading axis. Values are unchanged."""
    def convert(node):
        if not _has_layers(node):
            return node
        out = {k: v for k, v in node.items() if not _LAYER_KEY.match(k)}
        for name, layers in stacks(cfg).items():
            present = [i for i in layers if f"layers_{i}" in node]
            if not present:  # e.g. the router collection has no dense layers
                continue
            if len(present) != len(layers):
                raise ValueError(f"{name} needs layers {layers.start}..{layers.stop - 1}; found {present}")
            out[name] = jax.tree_util.tree_map(lambda *xs: _stack(xs), *[node[f"layers_{i}"] for i in layers])
        return out

    return jax.tree_util.tree_map(convert, tree, is_leaf=_has_layers)


def unstack_layers(tree, cfg: ModelConfig):
    """Scanned layout -> per-layer layout (`stack_layers` undone)."""
    def convert(node):
        if not _has_stacks(node):
            return node
        out = {k: v for k, v in node.items() if k not in (DENSE_STACK, MOE_STACK)}
        for name, layers in stacks(cfg).items():
            if name in node:
                for j, i in enumerate(layers):
                    out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, j=j: x[j], node[name])
        return out

    return jax.tree_util.tree_map(convert, tree, is_leaf=_has_stacks)


def init_variables(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8, runtime: Runtime = Runtime()) -> dict:
    """Plain (unboxed) variables of a freshly initialised model, in the runtime's layout: the scanned
    layout holds the same values as the per-layer one for a seed."""
    tokens = jnp.zeros((1, min(seq_len, cfg.max_position_embeddings)), jnp.int32)
    variables = nn.unbox(jax.jit(Transformer(cfg).init)(rng, tokens))
    return stack_layers(variables, cfg) if runtime.scan_layers else variables


def _abstract_init(cfg: ModelConfig, runtime: Runtime) -> dict:
    tokens = jnp.zeros((1, 2), jnp.int32)
    model = Transformer(cfg, Runtime(scan_layers=runtime.scan_layers))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))


def logical_axes(cfg: ModelConfig, runtime: Runtime = Runtime()) -> dict:
    """The same tree as the variables, with a PartitionSpec of logical axis names at each leaf (the
    scanned layout's stacked leaves lead with "layers")."""
    return nn.get_partition_spec(_abstract_init(cfg, runtime))


def variable_shapes(cfg: ModelConfig, runtime: Runtime = Runtime()) -> dict:
    return nn.unbox(_abstract_init(cfg, runtime))
