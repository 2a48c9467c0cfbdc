"""The training loop: data, jitted steps, orbax checkpoints with exact resume, metrics, sample.

Run it from `train.py` (absl flags) or call `run(TrainConfig(...))` directly, as the tests do.
A checkpoint holds the train state (params, optimizer state, router biases, step) and the data
iterator's position, so a resumed run sees exactly the batches, and gives exactly the losses, of
an uninterrupted one. Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a run killed at any moment leaves only whole checkpoints behind. A run writes only into
a workdir that is new, empty or already ours, and refuses anything under checkpoints/ it did not write
(orbax deletes old step folders); a checkpoint that does not restore is renamed aside, never deleted,
and the run resumes from the newest that does (`dsv3_jax.train.workdir`).

With `mesh` ("data=2,expert=4"), the state is created directly in its shardings (rules table in
`dsv3_jax.parallel.rules`), each step runs over the mesh, each process feeds its own rows of every
batch, and checkpoints are restored into the shardings of the current mesh, whatever mesh wrote
them. In a multi-process run every process runs this loop; only process 0 writes the metrics,
TensorBoard events and plots, and shows the progress bar, while all of them save and restore
checkpoints together (orbax's save and restore are collective).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from dsv3_jax.config import ModelConfig
from dsv3_jax.data import (
    BatchIterator,
    default_corpus_files,
    eval_batches,
    load_tokenizer,
    read_documents,
    resolve_files,
    split_documents,
    tokenize_documents,
)
from dsv3_jax.model import stack_layers, unstack_layers
from dsv3_jax.parallel.mesh import make_mesh, parse_mesh
from dsv3_jax.parallel.rules import batch_sharding, batch_shards
from dsv3_jax.runtime import Runtime
from dsv3_jax.train.metrics import FRESH, METRICS_FILE, MetricsWriter, read_metrics
from dsv3_jax.train.plots import write_plots
from dsv3_jax.train.progress import Progress
from dsv3_jax.train.sample import sample_text
from dsv3_jax.train.step import (
    OptimConfig,
    TrainState,
    init_state,
    init_state_sharded,
    jit_steps,
    state_shardings,
)
from dsv3_jax.train.workdir import (
    CHECKPOINTS,
    WorkdirError,
    check_checkpoints,
    check_workdir,
    claim_workdir,
    restore_newest,
    set_aside,
    warn,
)

# --precision -> (activation dtype, FP8 GEMMs in the linear layers). Master weights stay float32 in all.
PRECISIONS = {"fp32": ("float32", False), "bf16": ("bfloat16", False), "fp8": ("bfloat16", True)}
# What a DSA training stage adds to the metrics (train_step): the indexer's KL and its selection's recall.
DSA_METRICS = ("indexer_kl", "indexer_recall")
# --moments=auto keeps AdamW's moments in BF16 (as the V3 report does) from this many parameters: the
# real-size presets (V2-Lite 16B and up), where the optimizer state is a third of the memory.
BF16_MOMENTS_MIN_PARAMS = 1_000_000_000


class TrainingError(RuntimeError):
    """A problem with the user's input or run, reported as one message and a non-zero exit."""


class UsageError(TrainingError):
    """Flags that contradict each other or the config: one message and exit status 2, as for a bad flag."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    workdir: str
    model: str = "tiny"
    data: tuple[str, ...] = ()
    tokenizer: str = "byte"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    eval_every: int = 50
    log_every: int = 10
    print_every: int = 0  # with no progress bar (stderr not a terminal), a line every this many steps; 0: ~10 a run
    eval_batches: int = 4
    keep_checkpoints: int = 3
    precision: str = "fp32"
    stop_after: int | None = None  # steps to run in this invocation (time-sliced or preemptible jobs)
    sample_prompt: str = "def "
    sample_tokens: int = 160
    plots: bool = True
    # Device mesh "axis=size,..." over data, fsdp, expert, tensor (sizes multiply to the device
    # count). "": one process trains on one device, as without a mesh; several processes put all
    # devices on data.
    mesh: str = ""
    # Variants of the ops (dsv3_jax.runtime.Runtime): "auto" or a registered name.
    experts: str = "auto"
    attention: str = "auto"
    remat: str = "none"  # what a step keeps for the backward (dsv3_jax.ops.remat)
    # Layers compiled once, as scans; checkpoints then hold the scanned layout (model.stack_layers) and
    # say so, and a run resumes either layout's checkpoints in its own.
    scan_layers: bool = False
    grad_accum: int = 1  # microbatches per optimizer step
    moments: str = "auto"  # AdamW moments: float32, bfloat16, or auto (bfloat16 from BF16_MOMENTS_MIN_PARAMS)
    # DeepSeek-V3.2's training stage (configs with an indexer; Runtime.dsa_stage): "warmup" trains the indexer
    # alone against the dense attention, "sparse" everything over the indexer's selection; None: neither.
    dsa_stage: str | None = None


def model_config(tc: TrainConfig) -> ModelConfig:
    if tc.precision not in PRECISIONS:
        raise TrainingError(f"--precision={tc.precision!r}: expected one of {sorted(PRECISIONS)}")
    try:
        cfg = ModelConfig.from_json(tc.model)
    except (FileNotFoundError, ValueError) as e:
        raise TrainingError(f"--config: {e}") from e
    if tc.dsa_stage is not None and not cfg.has_indexer:
        raise UsageError(f"--dsa_stage={tc.dsa_stage} trains a DeepSeek Sparse Attention indexer, and --config "
                         f"{tc.model!r} has none (index_topk = 0)")
    if tc.seq_len > cfg.max_position_embeddings:
        raise TrainingError(f"--seq_len={tc.seq_len} is above the config's max_position_embeddings "
                            f"({cfg.max_position_embeddings})")
    return cfg


def runtime(tc: TrainConfig) -> Runtime:
    """How the run computes: --precision, --experts and --attention (a checkpoint is not tied to them)."""
    if tc.precision not in PRECISIONS:
        raise TrainingError(f"--precision={tc.precision!r}: expected one of {sorted(PRECISIONS)}")
    dtype, fp8 = PRECISIONS[tc.precision]
    try:
        return Runtime(dtype=dtype, fp8=fp8, experts=tc.experts, attention=tc.attention, remat=tc.remat,
                       scan_layers=tc.scan_layers, dsa_stage=tc.dsa_stage)
    except ValueError as e:
        raise TrainingError(str(e)) from e


def optim_config(tc: TrainConfig, cfg: ModelConfig) -> OptimConfig:
    """The optimizer of the run: the schedule from the flags, the moments' dtype and microbatching."""
    moments = tc.moments
    if moments == "auto":
        moments = "bfloat16" if cfg.total_params >= BF16_MOMENTS_MIN_PARAMS else "float32"
    if tc.grad_accum < 1 or tc.batch_size % tc.grad_accum:
        raise TrainingError(f"--grad_accum={tc.grad_accum}: must be a positive integer dividing --batch_size "
                            f"({tc.batch_size})")
    try:
        return OptimConfig(lr=tc.lr, warmup_steps=tc.warmup_steps, total_steps=tc.steps, moments_dtype=moments,
                           grad_accum=tc.grad_accum)
    except ValueError as e:
        raise TrainingError(str(e).replace("OptimConfig.moments_dtype", "--moments")) from e


def _data(tc: TrainConfig, cfg: ModelConfig):
    try:
        files = resolve_files(list(tc.data)) if tc.data else default_corpus_files()
        tokenizer = load_tokenizer(tc.tokenizer)
        train_docs, heldout_docs = split_documents(read_documents(files))
    except (FileNotFoundError, ValueError) as e:
        raise TrainingError(str(e)) from e
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TrainingError(f"--tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is "
                            f"{cfg.vocab_size}")
    window = tc.seq_len + 1 + cfg.mtp_depth
    try:
        batches = BatchIterator(tokenize_documents(train_docs, tokenizer), tc.batch_size, window, tc.seed,
                                jax.process_index(), jax.process_count())
        held = eval_batches(tokenize_documents(heldout_docs, tokenizer), tc.batch_size, window, tc.eval_batches)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    return tokenizer, batches, held


def _checkpoints(tc: TrainConfig) -> str:
    return os.path.abspath(os.path.join(tc.workdir, CHECKPOINTS))


def _manager(tc: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(_checkpoints(tc), options=options, item_names=("state", "data", "meta"))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _check_workdir(tc: TrainConfig) -> None:
    """Refuse, before anything is written, a --workdir that is not ours, or a checkpoints/ holding
    anything not ours (orbax deletes old step folders): dsv3_jax.train.workdir."""
    try:
        check_workdir(tc.workdir)
        check_checkpoints(_checkpoints(tc), tc.keep_checkpoints)
    except WorkdirError as e:
        raise TrainingError(str(e)) from e


def _open_workdir(tc: TrainConfig) -> ocp.CheckpointManager:
    """Create and mark the (checked) workdir, and open the checkpoint manager."""
    try:
        if jax.process_index() == 0:
            claim_workdir(tc.workdir)
    except WorkdirError as e:
        raise TrainingError(str(e)) from e
    _sync("dsv3_jax workdir claimed")
    return _manager(tc)


def _restore(mgr, cfg: ModelConfig, abstract, scan: bool, batches) -> tuple[TrainState | None, list]:
    """The newest checkpoint that restores, laid out as `abstract(scan)` says (shapes, dtypes, shardings;
    `scan` the run's layer layout), or None; and [(step, why)] of the newer ones that did not restore
    (corrupt: an older one did). A checkpoint of the other layout is read in its own and converted."""
    if not mgr.all_steps():
        return None, []

    def attempt(step: int) -> dict:
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved = ModelConfig.from_dict(meta["model"])
        if saved != cfg:
            raise TrainingError(f"the workdir holds a checkpoint of another model config (fields differ: "
                                f"{cfg.differences(saved)}); "
                                "use a new --workdir or the same --config")
        saved_scan = bool(meta.get("scan_layers", False))  # written before scanning: per layer
        got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract(saved_scan)),
                                                        data=ocp.args.JsonRestore()))
        if saved_scan == scan:
            return got
        return {"state": _relayout(got["state"], cfg, scan, abstract(scan)), "data": got["data"]}

    try:
        _, got, skipped = restore_newest(mgr.all_steps(), attempt, str(mgr.directory), passthrough=(TrainingError,))
    except WorkdirError as e:
        raise TrainingError(f"{e}; if they are damaged, move them out of {mgr.directory}/ to start again from "
                            "step 0") from e
    try:
        batches.restore(got["data"])
    except ValueError as e:
        hint = "resume with the run's own --data, --seq_len and --seed, or use a new --workdir"
        raise TrainingError(f"{e}: {hint}") from e
    return got["state"], skipped


def _set_aside_corrupt(tc: TrainConfig, mgr, skipped: list, start: int) -> ocp.CheckpointManager:
    """Move the checkpoints that did not restore out of orbax's view (renamed, never deleted), say so,
    and reopen the manager (it lists the steps when opened)."""
    mgr.close()
    if jax.process_index() == 0:
        for step, why in skipped:
            try:
                moved = set_aside(_checkpoints(tc), step)
            except OSError as e:
                raise TrainingError(f"{_checkpoints(tc)}/{step} does not restore ({why}) and cannot be moved "
                                    f"aside: {e}") from e
            warn(f"checkpoint {_checkpoints(tc)}/{step} does not restore ({why}); moved it to {moved}; "
                 f"resuming from step {start}")
    _sync("dsv3_jax corrupt checkpoints set aside")
    return _manager(tc)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the train state and the batches live: the default device (no mesh), or a mesh."""

    mesh: Mesh | None = None
    state: TrainState | None = None  # NamedShardings, with a mesh
    batch: NamedSharding | None = None

    def context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def put(self, local_rows: np.ndarray, batch_size: int):
        """This process's rows of a global batch -> what the steps take."""
        if self.mesh is None:
            return local_rows
        return jax.make_array_from_process_local_data(self.batch, local_rows, (batch_size, *local_rows.shape[1:]))


def make_layout(tc: TrainConfig, cfg: ModelConfig, optim: OptimConfig) -> Layout:
    if not tc.mesh and jax.process_count() == 1:
        return Layout()
    try:
        mesh = make_mesh(parse_mesh(tc.mesh, jax.device_count()))
    except ValueError as e:
        raise TrainingError(f"--mesh: {e}") from e
    shards = batch_shards(mesh)
    if tc.batch_size % (shards * tc.grad_accum):
        raise TrainingError(f"--batch_size={tc.batch_size} does not split over the mesh's {shards} batch shards "
                            f"(data x fsdp x expert) in each of --grad_accum={tc.grad_accum} microbatches; "
                            f"use a multiple of {shards * tc.grad_accum}")
    batch = batch_sharding(mesh)
    _check_process_rows(batch, tc)
    return Layout(mesh, state_shardings(cfg, optim, mesh, runtime(tc)), batch)


def _check_process_rows(batch: NamedSharding, tc: TrainConfig) -> None:
    """Each process feeds its own consecutive 1/P of the rows (BatchIterator's split), so its devices
    must hold exactly that many distinct rows: the mesh axes spanning processes must shard the batch."""
    rows = set()
    for index in batch.addressable_devices_indices_map((tc.batch_size, 1)).values():
        rows.update(range(*index[0].indices(tc.batch_size)))
    share = tc.batch_size // jax.process_count()
    if len(rows) != share or max(rows) - min(rows) + 1 != share:
        raise TrainingError(f"--mesh={tc.mesh!r}: the devices of process {jax.process_index()} hold {len(rows)} "
                            f"of the {tc.batch_size} batch rows, but each of the {jax.process_count()} processes "
                            f"feeds its own {share}; give the processes different data/fsdp/expert coordinates")


def _relayout(state: TrainState, cfg: ModelConfig, scan: bool, abstract: TrainState) -> TrainState:
    """A state of the other layer layout in `scan`'s (the same values), placed as `abstract` says."""
    convert = stack_layers if scan else unstack_layers
    state = state.replace(params=convert(state.params, cfg), opt_state=convert(state.opt_state, cfg),
                          router=convert(state.router, cfg))
    return jax.tree_util.tree_map(lambda x, a: jax.device_put(x, a.sharding), state, abstract)


def _initial_state(mgr, cfg: ModelConfig, optim: OptimConfig, seed: int, batches, layout: Layout,
                   rt: Runtime) -> tuple[TrainState, list]:
    """The workdir's newest checkpoint that restores if there is one, else a fresh state, laid out as
    `layout` and the runtime's layer layout say; and the newer checkpoints that did not restore."""
    def abstract(scan: bool) -> TrainState:
        other = rt.replace(scan_layers=scan)
        shapes = jax.eval_shape(lambda: init_state(cfg, optim, seed, other))
        shardings = (jax.tree_util.tree_map(lambda _: SingleDeviceSharding(jax.devices()[0]), shapes)
                     if layout.mesh is None else
                     layout.state if scan == rt.scan_layers else state_shardings(cfg, optim, layout.mesh, other))
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      shapes, shardings)

    restored, skipped = _restore(mgr, cfg, abstract, rt.scan_layers, batches)
    if restored is not None:
        return restored, skipped
    if layout.mesh is None:
        return init_state(cfg, optim, seed, rt), skipped
    return init_state_sharded(cfg, optim, seed, layout.state, rt), skipped


def _save(mgr, step: int, state: TrainState, batches, cfg: ModelConfig, tokenizer: str, scan: bool) -> None:
    # The tokenizer spec travels with the weights, so infer.py and export find it without a flag; the
    # layer layout says how to read them (model.unstack_layers).
    meta = {"model": cfg.to_dict(), "step": step, "scan_layers": scan,
            "tokenizer": tokenizer if tokenizer == "byte" else os.path.abspath(tokenizer)}
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=ocp.args.JsonSave(batches.state()),
                                           meta=ocp.args.JsonSave(meta)))


def _record(m: dict, tokens_per_s: float) -> dict:
    loads = {k: np.asarray(v) for k, v in m["expert_load"].items()}
    rec = {k: float(m[k]) for k in ("loss", "ce", "mtp_loss", "balance_loss", "lr", "grad_norm", *DSA_METRICS)
           if k in m}
    rec["tokens_per_s"] = tokens_per_s
    rec["expert_max_over_mean"] = {k: float(v.max() / v.mean()) for k, v in loads.items()}
    rec["expert_load"] = {k: v.tolist() for k, v in loads.items()}
    return rec


def _evaluate(evaluate, state, held) -> float:
    return float(np.mean([float(evaluate(state, b)["eval_loss"]) for b in held]))


class _NoMetrics:
    """What processes other than the first log to: nothing."""

    def write(self, step: int, record: dict) -> dict:
        return record

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _local_state(state: TrainState) -> TrainState:
    """With several processes, the parameters and router biases gathered whole onto this process's
    first device (the sample runs there); otherwise the state as it is."""
    if jax.process_count() == 1:
        return state
    gathered = multihost_utils.process_allgather((state.params, state.router), tiled=True)
    params, router = jax.device_put(gathered, jax.local_devices()[0])
    return state.replace(params=params, router=router)


def param_specs(state: TrainState) -> dict[str, object]:
    """"layers_1/ffn/w1" -> the PartitionSpec each parameter is actually laid out with."""
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    return {"/".join(str(k.key) for k in path): getattr(x.sharding, "spec", None) for path, x in flat}


def run(tc: TrainConfig) -> dict:
    cfg, rt = model_config(tc), runtime(tc)
    _check_workdir(tc)
    tokenizer, batches, held = _data(tc, cfg)
    optim = optim_config(tc, cfg)
    layout = make_layout(tc, cfg, optim)
    mgr = _open_workdir(tc)
    with layout.context():
        state, skipped = _initial_state(mgr, cfg, optim, tc.seed, batches, layout, rt)
        if skipped:
            mgr = _set_aside_corrupt(tc, mgr, skipped, int(state.step))
        state, summary = _train(tc, cfg, rt, optim, state, batches, held, mgr, layout)
    mgr.wait_until_finished()
    mgr.close()
    if layout.mesh is not None:
        summary["mesh"] = dict(layout.mesh.shape)
        summary["param_specs"] = param_specs(state)
    if tc.plots and jax.process_index() == 0:
        summary["plots"] = write_plots(tc.workdir)
    if tc.sample_tokens:
        summary["sample"] = sample_text(cfg, _local_state(state), tokenizer, tc.sample_prompt, tc.sample_tokens,
                                        seed=tc.seed, runtime=rt)
    return summary


def _what_is_kept(mgr) -> str:
    """What a stopped run leaves to resume from (nothing non-finite is ever saved)."""
    kept = mgr.latest_step()
    if kept is None:
        return "no checkpoint was saved, so the next run starts again from step 0"
    return f"the checkpoint of step {kept} is kept and the next run resumes from it"


def _recorded_first_eval(workdir: str) -> dict:
    """{"first_eval_loss": the held-out loss metrics.jsonl holds for step 0}, or {} if it holds none."""
    try:
        records = read_metrics(os.path.join(workdir, METRICS_FILE))
    except (OSError, ValueError):
        return {}
    first = [r["eval_loss"] for r in records if r.get("step") == 0 and "eval_loss" in r]
    return {"first_eval_loss": first[-1]} if first else {}


def _train(tc: TrainConfig, cfg: ModelConfig, rt: Runtime, optim: OptimConfig, state: TrainState, batches, held,
           mgr, layout: Layout) -> tuple[TrainState, dict]:
    """Steps from the state's step up to tc.steps (or tc.stop_after of them), checkpointing and logging."""
    start = int(state.step)
    primary = jax.process_index() == 0
    train, evaluate = jit_steps(cfg, optim, layout.state, layout.batch, rt)
    share = tc.batch_size // jax.process_count()
    lo = jax.process_index() * share
    held = [layout.put(b[lo:lo + share], tc.batch_size) for b in held]
    tokens_per_step = tc.batch_size * tc.seq_len
    summary = {"start_step": start, "steps": tc.steps, "losses": {}}
    first_eval = _evaluate(evaluate, state, held) if start == 0 else None
    if first_eval is None and primary:  # resumed: the step-0 evaluation is in the run's record
        summary.update(_recorded_first_eval(tc.workdir))
    with MetricsWriter(tc.workdir, resume_step=start if start else FRESH) if primary else _NoMetrics() as log:
        if first_eval is not None:
            log.write(0, {"eval_loss": first_eval})
            summary["first_eval_loss"] = first_eval
        bar = Progress(tc.steps, start, tokens_per_step, disable=None if primary else True,
                       print_every=tc.print_every)
        t0 = time.perf_counter()
        end = tc.steps if tc.stop_after is None else min(tc.steps, start + tc.stop_after)
        for step in range(start + 1, end + 1):
            state, m = train(state, layout.put(batches.next(), tc.batch_size))
            loss = float(m["loss"])
            if not (math.isfinite(loss) and bool(m["params_finite"])):  # stop before a checkpoint holds it
                bar.close()
                mgr.wait_until_finished()
                what = f"loss became {loss}" if not math.isfinite(loss) else "the weights became non-finite"
                raise TrainingError(f"{what} at step {step}; {_what_is_kept(mgr)} (lower --lr or check the data)")
            summary["losses"][step] = loss
            tokens_per_s = tokens_per_step / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            bar.update(step, loss, tokens_per_s, ce=float(m["ce"]),
                       extra={k.replace("_", " "): float(m[k]) for k in DSA_METRICS if k in m})
            rec = _record(m, tokens_per_s) if step % tc.log_every == 0 or step == tc.steps else None
            if step % tc.eval_every == 0 or step == tc.steps:
                rec = rec or _record(m, tokens_per_s)
                rec["eval_loss"] = _evaluate(evaluate, state, held)
                summary["eval_loss"] = rec["eval_loss"]
                bar.evaluated(step, rec["eval_loss"])
            if rec is not None:
                log.write(step, rec)
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == end:
                _save(mgr, step, state, batches, cfg, tc.tokenizer, rt.scan_layers)
        bar.close()
    if "eval_loss" not in summary:  # nothing left to train: still report where the model stands
        summary["eval_loss"] = _evaluate(evaluate, state, held)
    return state, summary
