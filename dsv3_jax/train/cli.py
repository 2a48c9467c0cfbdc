"""What `train.py` runs: flags -> TrainConfig -> loop.run, with errors as one message and exit 1."""
from __future__ import annotations

import sys

from absl import logging

from dsv3_jax.train.loop import TrainConfig, TrainingError, run


def config_from_flags(f) -> TrainConfig:
    return TrainConfig(workdir=f.workdir, model=f.config, data=tuple(f.data), tokenizer=f.tokenizer,
                       steps=f.steps, batch_size=f.batch_size, seq_len=f.seq_len, lr=f.lr,
                       warmup_steps=f.warmup_steps, seed=f.seed, checkpoint_every=f.checkpoint_every,
                       eval_every=f.eval_every, precision=f.precision,
                       stop_after=f.stop_after)


def main(argv, flags) -> None:
    if len(argv) > 1:
        sys.exit(f"train.py: unexpected arguments {argv[1:]}")
    if not flags["verbosity"].present:  # orbax logs every checkpoint step at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        summary = run(config_from_flags(flags))
    except TrainingError as e:
        sys.exit(f"train.py: {e}")
    if summary["start_step"] >= summary["steps"]:
        print(f"the workdir is already at step {summary['start_step']}; raise --steps to train further")
    first = summary.get("first_eval_loss")
    print(f"held-out loss: {first:.3f} -> {summary['eval_loss']:.3f}" if first is not None
          else f"held-out loss: {summary['eval_loss']:.3f}")
    if "sample" in summary:
        print(f"sample:\n{summary['sample']}")
