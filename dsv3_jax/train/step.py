"""Train state, optimizer and the jitted train / eval steps."""
from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import init_variables, logical_axes, variable_shapes
from dsv3_jax.ops.sparse_attention import WARMUP
from dsv3_jax.parallel.rules import param_shardings, replicated
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.objective import compute_loss, expert_load, layer_loads, update_router_bias

MOMENT_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW as the V3 report trains (s.4.2): betas (0.9, 0.95), weight decay 0.1, clip 1.0,
    linear warmup then cosine decay to `final_lr_ratio` of the peak.

    `moments_dtype` "bfloat16" keeps AdamW's two moments in BF16, as the V3 report does (s.3.3.4),
    halving the optimizer state; each update is computed in float32 from them. `grad_accum` > 1
    splits each batch into that many microbatches whose gradients are averaged before one update:
    the same step (equal-sized microbatches, every loss term a mean) in less activation memory."""

    lr: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 300
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    moments_dtype: str = "float32"
    grad_accum: int = 1

    def __post_init__(self):
        if self.moments_dtype not in MOMENT_DTYPES:
            raise ValueError(f"OptimConfig.moments_dtype = {self.moments_dtype!r}: must be one of {MOMENT_DTYPES}")
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"OptimConfig.grad_accum = {self.grad_accum!r}: must be a positive integer")


def lr_schedule(o: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, o.lr, max(o.warmup_steps, 1), max(o.total_steps, o.warmup_steps + 1), o.lr * o.final_lr_ratio)


def _stored_as(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` with its floating-point state kept in `dtype` between steps and updated in float32."""
    cast = lambda tree, dt: jax.tree_util.tree_map(
        lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def update(updates, state, params=None):
        out, new = inner.update(updates, cast(state, jnp.float32), params)
        return out, cast(new, dtype)

    return optax.GradientTransformation(lambda params: cast(inner.init(params), dtype), update)


def make_optimizer(o: OptimConfig) -> optax.GradientTransformation:
    # No decay on vectors (norm scales): decaying them toward 0 would shrink the activations.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    clip = optax.clip_by_global_norm(o.clip_norm)
    if o.moments_dtype == "float32":
        return optax.chain(clip, optax.adamw(lr_schedule(o), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                                              mask=decay_mask))
    # optax.adamw's own chain (the same state tree, so a run may resume with the other dtype), with the
    # moments stored in BF16.
    adam = _stored_as(optax.scale_by_adam(b1=o.b1, b2=o.b2), jnp.dtype(o.moments_dtype))
    return optax.chain(clip, optax.chain(adam, optax.add_decayed_weights(o.weight_decay, decay_mask),
                                         optax.scale_by_learning_rate(lr_schedule(o))))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    router: dict  # balancing biases: state moved by update_router_bias, never by the optimizer


def init_state(cfg: ModelConfig, optim: OptimConfig, seed: int, runtime: Runtime = Runtime()) -> TrainState:
    """A fresh state in the runtime's parameter layout (per layer, or scanned: the same values)."""
    variables = init_variables(cfg, jax.random.PRNGKey(seed), runtime=runtime)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=make_optimizer(optim).init(params), router=variables.get("router", {}))


def state_shardings(cfg: ModelConfig, optim: OptimConfig, mesh: jax.sharding.Mesh,
                    runtime: Runtime = Runtime()) -> TrainState:
    """A TrainState of NamedShardings: parameters by the rules table, each optimizer moment like
    its parameter, scalars (step, Adam's count) replicated, router biases replicated."""
    shapes = variable_shapes(cfg, runtime)
    variables = param_shardings(logical_axes(cfg, runtime), shapes, mesh)
    params = variables["params"]
    optimizer = make_optimizer(optim)
    abstract_opt = jax.eval_shape(optimizer.init, shapes["params"])
    opt_state = optax.tree_utils.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt, params,
        transform_non_params=lambda _: replicated(mesh))
    return TrainState(step=replicated(mesh), params=params, opt_state=opt_state, router=variables.get("router", {}))


def init_state_sharded(cfg: ModelConfig, optim: OptimConfig, seed: int, shardings: TrainState,
                       runtime: Runtime = Runtime()) -> TrainState:
    """`init_state`, computed under jit straight into `shardings`: no device ever holds a whole copy
    of a sharded parameter or moment. The values equal `init_state`'s (jax's random numbers do not
    depend on how the output is sharded)."""
    return jax.jit(lambda: init_state(cfg, optim, seed, runtime), out_shardings=shardings)()


def _gradients(params, router, window, cfg: ModelConfig, runtime: Runtime):
    """-> (LossParts, {layer: expert load [E]}, gradients) of one (micro)batch."""
    def loss_fn(p):
        parts, routes = compute_loss(p, router, window, cfg, runtime)
        return parts.loss, (parts, {name: expert_load(r, cfg.n_routed_experts) for name, r in routes.items()})

    (_, (parts, loads)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return parts, loads, grads


def accumulated_gradients(params, router, window: jax.Array, cfg: ModelConfig, optim: OptimConfig,
                          runtime: Runtime = Runtime()):
    """`_gradients` of the whole batch, as the mean over `optim.grad_accum` microbatches. Every term
    of the loss is a mean over equal-sized microbatches, and so are the expert loads."""
    n = optim.grad_accum
    if n == 1:
        return _gradients(params, router, window, cfg, runtime)
    if window.shape[0] % n:
        raise ValueError(f"a batch of {window.shape[0]} rows does not split into grad_accum={n} microbatches")
    # Microbatch k takes rows k, k + n, ...: each device's rows feed every microbatch alike.
    micro = window.reshape(window.shape[0] // n, n, -1).swapaxes(0, 1)
    one = functools.partial(_gradients, cfg=cfg, runtime=runtime)

    def add(total, w):
        return jax.tree_util.tree_map(jnp.add, total, one(params, router, w)), None

    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, params, router, micro[0]))
    total, _ = jax.lax.scan(add, zeros, micro)
    return jax.tree_util.tree_map(lambda x: x / n, total)


def is_indexer(params) -> dict:
    """params -> the same tree of Python bools: True at the DSA indexers' weights."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) == "indexer" for k in path), params)


def indexer_only(optimizer: optax.GradientTransformation, updates, new_opt_state, old_opt_state, params):
    """The DSA warm-up trains the indexers alone (V3.2 report s.2.1.1): every other parameter's update is
    zero (AdamW's weight decay would move it) and its moments keep their values. The optimizer is the one
    of every stage, so its state has one structure and a run resumes across --dsa_stage."""
    train = is_indexer(params)
    updates = jax.tree_util.tree_map(lambda u, t: u if t else jnp.zeros_like(u), updates, train)
    # Per leaf of the state: the new value at an indexer's moments and at the shared counters, else the old.
    take_new = optax.tree_utils.tree_map_params(optimizer, lambda _, t: t, new_opt_state, train,
                                                transform_non_params=lambda _: True)
    opt_state = jax.tree_util.tree_map(lambda t, new, old: new if t else old, take_new, new_opt_state, old_opt_state)
    return updates, opt_state


def train_step(state: TrainState, window: jax.Array, cfg: ModelConfig, optim: OptimConfig,
               runtime: Runtime = Runtime()):
    """One optimizer step plus the bias update; returns (new state, metrics)."""
    parts, loads, grads = accumulated_gradients(state.params, state.router, window, cfg, optim, runtime)
    optimizer = make_optimizer(optim)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    warmup = runtime.dsa_stage == WARMUP
    if warmup:
        updates, opt_state = indexer_only(optimizer, updates, opt_state, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The router biases are the main model's state too: frozen in the warm-up.
    router = update_router_bias(state.router, loads, cfg.bias_update_speed) if state.router and not warmup \
        else state.router
    metrics = {"loss": parts.loss, "ce": parts.ce, "mtp_loss": parts.mtp, "balance_loss": parts.balance,
               "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(optim)(state.step),
               "expert_load": layer_loads(loads, cfg),
               # A finite loss can still produce non-finite weights (an lr or update gone bad);
               # the loop checks this before it may checkpoint the new state.
               "params_finite": jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree_util.tree_leaves(params)]))}
    if runtime.dsa_stage is not None:
        metrics.update(indexer_kl=parts.indexer_kl, indexer_recall=parts.indexer_recall)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, router=router)
    return new, metrics


def eval_step(state: TrainState, window: jax.Array, cfg: ModelConfig, runtime: Runtime = Runtime()) -> dict:
    parts, _ = compute_loss(state.params, state.router, window, cfg, runtime)
    return {"eval_loss": parts.ce, "eval_mtp_loss": parts.mtp}


def jit_steps(cfg: ModelConfig, optim: OptimConfig, shardings: TrainState | None = None,
              batch_sharding: jax.sharding.NamedSharding | None = None, runtime: Runtime = Runtime()):
    """The two steps, jitted once per (config, optimizer); the state buffers are donated.

    With `shardings` (from `state_shardings`) and `batch_sharding`, the state keeps its layout from
    step to step and the metrics come back replicated, so every process can read them.
    """
    if shardings is None:
        train = jax.jit(lambda s, w: train_step(s, w, cfg, optim, runtime), donate_argnums=0)
        evaluate = jax.jit(lambda s, w: eval_step(s, w, cfg, runtime))
        return train, evaluate
    metrics = replicated(batch_sharding.mesh)
    train = jax.jit(lambda s, w: train_step(s, w, cfg, optim, runtime), in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, metrics), donate_argnums=0)
    evaluate = jax.jit(lambda s, w: eval_step(s, w, cfg, runtime), in_shardings=(shardings, batch_sharding),
                       out_shardings=metrics)
    return train, evaluate
