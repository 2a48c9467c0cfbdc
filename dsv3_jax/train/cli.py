"""What `train.py` runs: flags -> TrainConfig -> loop.run, with errors as one message and exit 1."""
from __future__ import annotations

import math
import os
import sys

import jax
from absl import logging

from dsv3_jax.parallel.distributed import maybe_initialize
from dsv3_jax.train.loop import TrainConfig, TrainingError, UsageError, run
from dsv3_jax.train.progress import describe_workdir

# Each numeric flag of train.py -> (its rule, as told to the user; whether a value keeps it). A flag left
# unset (None) is not checked.
FLAG_RULES = {
    "steps": (">= 1", lambda v: v >= 1),
    "batch_size": (">= 1", lambda v: v >= 1),
    "seq_len": (">= 1", lambda v: v >= 1),
    "lr": ("a finite number > 0", lambda v: math.isfinite(v) and v > 0),
    "warmup_steps": (">= 0", lambda v: v >= 0),
    "seed": (">= 0", lambda v: v >= 0),
    "checkpoint_every": (">= 0 (0: only at the end)", lambda v: v >= 0),
    "eval_every": (">= 1", lambda v: v >= 1),
    "stop_after": (">= 1", lambda v: v >= 1),
    "sample_tokens": (">= 0 (0: none)", lambda v: v >= 0),
    "grad_accum": (">= 1", lambda v: v >= 1),
    "num_processes": (">= 1", lambda v: v >= 1),
    "initialization_timeout": (">= 1 (seconds)", lambda v: v >= 1),
    "heartbeat_timeout": (">= 1 (seconds)", lambda v: v >= 1),
}


def check_flags(f) -> None:
    """Refuse a nonsensical numeric flag up front (before a device, a file or a compile is touched)."""
    for name, (rule, ok) in FLAG_RULES.items():
        value = getattr(f, name)
        if value is not None and not ok(value):
            raise TrainingError(f"--{name} must be {rule}, got {value}")


def config_from_flags(f) -> TrainConfig:
    return TrainConfig(workdir=f.workdir, model=f.config, data=tuple(f.data), tokenizer=f.tokenizer,
                       steps=f.steps, batch_size=f.batch_size, seq_len=f.seq_len, lr=f.lr,
                       warmup_steps=f.warmup_steps, seed=f.seed, checkpoint_every=f.checkpoint_every,
                       eval_every=f.eval_every, precision=f.precision,
                       stop_after=f.stop_after, sample_tokens=f.sample_tokens, mesh=f.mesh, experts=f.experts,
                       attention=f.attention, remat=f.remat, grad_accum=f.grad_accum, moments=f.moments,
                       scan_layers=f.scan_layers, dsa_stage=f.dsa_stage)


def _abandon_run(e: Exception) -> None:
    """A collective failed, most often because another process died. Exit at once: a normal exit
    would wait in jax.distributed's shutdown barrier for the dead process until its heartbeat
    times out, and then abort anyway."""
    sys.stderr.write(f"train.py: process {jax.process_index()} of {jax.process_count()} stops: {e}\n"
                     "train.py: another process has probably died; see its log. Resume from the last "
                     "checkpoint by restarting all processes.\n")
    sys.stderr.flush()
    os._exit(1)


def main(argv, flags) -> None:
    if len(argv) > 1:
        sys.exit(f"train.py: unexpected arguments {argv[1:]}")
    if not flags["verbosity"].present:  # orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    try:  # before anything touches a device
        check_flags(flags)
        maybe_initialize(flags.coordinator_address, flags.num_processes, flags.process_id,
                         initialization_timeout=flags.initialization_timeout,
                         heartbeat_timeout=flags.heartbeat_timeout)
    except (TrainingError, ValueError) as e:
        sys.exit(f"train.py: {e}")
    try:
        summary = run(config_from_flags(flags))
    except UsageError as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        sys.exit(f"train.py: {e}")
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        _abandon_run(e)
    if jax.process_index() != 0:  # process 0 reports for the run
        return
    if summary["start_step"] >= summary["steps"]:
        print(f"the workdir is already at step {summary['start_step']}; raise --steps to train further")
    first = summary.get("first_eval_loss")
    print(f"held-out loss: {first:.3f} -> {summary['eval_loss']:.3f}" if first is not None
          else f"held-out loss: {summary['eval_loss']:.3f}")
    if "sample" in summary:
        print(f"sample:\n{summary['sample']}")
    print(describe_workdir(flags.workdir), flush=True)  # last: where everything went
