"""DeepSeek-V3's training objective and its auxiliary-loss-free balancing (V3 report s.2.1.2, s.2.2).

A batch row is a window of T + 1 + D tokens (D = MTP depth): the model reads the first T, the
main head predicts tokens 1..T, and MTP depth k predicts tokens k+1..T+k.

    loss = CE_main + (lambda / D) * sum_k CE_k + alpha * sum_layers L_bal

L_bal is the complementary sequence-wise balance loss: per sequence, f_i = E/(K T) * (tokens
routed to expert i) and P_i = mean over tokens of the normalised affinity s_i / sum_j s_j;
L_bal = sum_i f_i P_i (f carries no gradient). The router bias is not trained by the loss: after
each step it moves by gamma toward balance (`update_router_bias`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.moe import Routing
from dsv3_jax.model import Transformer, stacks
from dsv3_jax.ops import dispatch
from dsv3_jax.ops.cross_entropy import head_cross_entropy
from dsv3_jax.ops.sparse_attention import WARMUP
from dsv3_jax.runtime import Runtime


class LossParts(NamedTuple):
    loss: jax.Array  # the total that is differentiated
    ce: jax.Array  # main next-token cross-entropy
    mtp: jax.Array  # mean MTP cross-entropy over depths (0 without MTP)
    balance: jax.Array  # sum over MoE layers of the sequence-wise balance loss
    # DSA training stages (Runtime.dsa_stage; 0 outside them): the indexer's KL to the main attention and
    # the share of the dense attention's mass its selection keeps, each the mean over attention layers.
    indexer_kl: jax.Array = 0.0
    indexer_recall: jax.Array = 0.0


def cross_entropy(logits: jax.Array, targets: jax.Array, runtime: Runtime = Runtime()) -> jax.Array:
    """Mean next-token cross-entropy of logits [..., vocab] against integer targets [...]."""
    # Flattened to [N, vocab]: XLA:CPU handles the 2-D backward without a transposing copy.
    return dispatch.cross_entropy_fn(runtime)(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def routings(intermediates: dict) -> dict[str, Routing]:
    """Every MoE layer's sown Routing, keyed by its path ("layers_1", "mtp_0/block"); a scanned stack's
    ("moe_layers") holds its layers' Routings stacked on a leading axis."""
    found = {}

    def walk(tree, path):
        for key, value in tree.items():
            if key == "routing":
                found["/".join(path[:-1])] = value[0]
            elif isinstance(value, dict):
                walk(value, (*path, key))

    walk(intermediates, ())
    return found


def indexer_terms(intermediates: dict) -> jax.Array | None:
    """[layers, 2]: each attention layer's sown [indexer KL, recall] (MLA in a DSA training stage; a scanned
    stack's come stacked), MTP blocks' included; None where none was sown."""
    found = []

    def walk(tree):
        for key, value in tree.items():
            if key == "dsa":
                found.append(value[0].reshape(-1, 2))
            elif isinstance(value, dict):
                walk(value)

    walk(intermediates)
    return jnp.concatenate(found) if found else None


def balance_loss(r: Routing, batch: int, cfg: ModelConfig) -> jax.Array:
    """Sequence-wise balance loss of one layer, averaged over the batch's sequences."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    experts = r.experts.reshape(batch, -1, k)
    t = experts.shape[1]
    counts = jax.nn.one_hot(experts, e, dtype=jnp.float32).sum(axis=(1, 2))  # [B, E]
    f = jax.lax.stop_gradient(counts * e / (k * t))
    s = r.scores.reshape(batch, t, e)
    p = jnp.mean(s / jnp.sum(s, axis=-1, keepdims=True), axis=1)  # [B, E]
    return jnp.mean(jnp.sum(f * p, axis=-1))


def per_layer(fn, r: Routing) -> jax.Array:
    """fn of one layer's Routing; over a scanned stack's, fn of each layer's, stacked."""
    return jax.vmap(fn)(r) if r.weights.ndim == 3 else fn(r)


def layer_loads(loads: dict[str, jax.Array], cfg: ModelConfig) -> dict[str, jax.Array]:
    """{path: load} with each scanned stack's [layers, E] loads split into its layers' names."""
    out = {}
    for name, load in loads.items():
        layers = stacks(cfg).get(name)
        out.update({f"layers_{i}": load[j] for j, i in enumerate(layers)} if layers else {name: load})
    return out


def expert_load(r: Routing, num_experts: int) -> jax.Array:
    """[E] fraction of this batch's routed assignments that went to each expert ([layers, E] for a
    scanned stack's Routing)."""
    if r.weights.ndim == 3:
        return per_layer(lambda one: expert_load(one, num_experts), r)
    counts = jnp.zeros((num_experts,), jnp.float32).at[r.experts.reshape(-1)].add(1.0)
    return counts / counts.sum()


def compute_loss(params, router, window: jax.Array, cfg: ModelConfig, runtime: Runtime = Runtime()):
    """window [B, T + 1 + D] -> (LossParts, {layer: Routing})."""
    d = cfg.mtp_depth
    t = window.shape[1] - 1 - d
    tokens = window[:, :t]
    variables = {"params": params, **({"router": router} if router else {})}
    (h, mtp_h, head), state = Transformer(cfg, runtime).apply(
        variables, tokens, future=window[:, : t + d], method=Transformer.features, mutable=["intermediates"])
    ce_fn, chunks = dispatch.cross_entropy_fn(runtime), dispatch.head_chunks(tokens.shape[0], t, head.shape[1])
    loss = lambda x, targets: head_cross_entropy(x, head, targets, ce_fn, chunks)
    ce = loss(h, window[:, 1: t + 1])
    mtp = jnp.zeros(())
    if d:
        mtp = jnp.mean(jnp.stack([loss(mtp_h[k - 1], window[:, k + 1: t + k + 1]) for k in range(1, d + 1)]))
    routes = routings(state.get("intermediates", {}))
    balance = sum((jnp.sum(per_layer(lambda one: balance_loss(one, window.shape[0], cfg), r)) for r in routes.values()),
                  jnp.zeros(()))
    # (lambda / D) * sum_k L_k == lambda * mean_k L_k.
    total = ce + cfg.mtp_loss_weight * mtp + cfg.aux_loss_alpha * balance
    dsa = indexer_terms(state.get("intermediates", {}))
    if dsa is None:
        return LossParts(total, ce, mtp, balance), routes
    # Each layer's indexer learns from its own KL alone (its input is detached, the top-k passes no
    # gradient), so the KLs are summed; the warm-up trains nothing else (V3.2 report s.2.1.1).
    kl = jnp.sum(dsa[:, 0])
    total = kl if runtime.dsa_stage == WARMUP else total + kl
    return LossParts(total, ce, mtp, balance, jnp.mean(dsa[:, 0]), jnp.mean(dsa[:, 1])), routes


def update_router_bias(router: dict, loads: dict[str, jax.Array], gamma: float) -> dict:
    """b_i += gamma * sign(mean load - load_i): overloaded experts become less attractive. A scanned
    stack's biases and loads are [layers, E], each layer balanced on its own."""
    def step(path, bias):
        layer = "/".join(p.key for p in path[:-2])  # .../<layer>/ffn/bias -> <layer>
        load = loads[layer]
        return bias + gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)

    return jax.tree_util.tree_map_with_path(step, router)
