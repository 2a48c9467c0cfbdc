"""FP8 against BF16 training: the same model, seed, data and steps; the held-out loss of each at the end.

DeepSeek's fine-grained FP8 recipe (V3 report s.3.3; paper s.3.1) keeps the relative loss error against
BF16 below 0.25% on ~16B and ~230B models over long runs. This trains the `small` preset twice through
the library's training loop (`dsv3_jax.train.loop.run`, two workdirs in a temporary directory), once with
--precision=bf16 and once with --precision=fp8 (E4M3 GEMMs in the linear layers), then prints both
final held-out losses and the relative gap |fp8 - bf16| / bf16. On CPU the FP8 GEMMs run as their
plain-jnp reference (exact E4M3 inputs, FP32 promotion every 128 of K), so this measures the numerics,
not the speed.

The defaults take about 10 minutes on 2 CPU cores.
Usage: python benchmarks/fp8_vs_bf16.py [--steps 200] [--batch_size 8] [--seq_len 128] [--eval_batches 8] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from dsv3_jax.train.loop import TrainConfig, run

PRECISIONS = ("bf16", "fp8")
PAPER_GAP = 0.0025  # relative loss error the report states for FP8 against BF16


def train(precision: str, args: argparse.Namespace, root: str) -> dict:
    tc = TrainConfig(workdir=os.path.join(root, precision), model=args.model, steps=args.steps,
                     batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                     eval_every=args.steps, log_every=args.steps, eval_batches=args.eval_batches,
                     precision=precision, sample_tokens=0, plots=False)
    t = time.perf_counter()
    summary = run(tc)
    losses = [summary["losses"][s] for s in sorted(summary["losses"])]
    tail = max(1, len(losses) // 10)
    return {"eval_loss": summary["eval_loss"], "first_eval_loss": summary["first_eval_loss"],
            "train_objective_tail": float(np.mean(losses[-tail:])), "seconds": time.perf_counter() - t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each run")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--eval_batches", type=int, default=8, help="held-out batches averaged for the final loss")
    p.add_argument("--model", default="small", help="preset name or ModelConfig JSON")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        results = {prec: train(prec, args, root) for prec in PRECISIONS}
    bf16, fp8 = results["bf16"]["eval_loss"], results["fp8"]["eval_loss"]
    gap = abs(fp8 - bf16) / bf16
    if args.json:
        print(json.dumps({"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                          "seq_len": args.seq_len, "eval_batches": args.eval_batches, "seed": args.seed,
                          **{f"{k}_{prec}": v for prec, r in results.items() for k, v in r.items()},
                          "relative_gap": gap, "paper_gap_bound": PAPER_GAP}))
        return
    print(f"{args.model}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, seed {args.seed}, "
          f"held-out loss over {args.eval_batches} batches")
    print(f"{'precision':>9} {'first eval':>10} {'final eval':>10} {'train obj. (last 10%)':>21} {'seconds':>8}")
    for prec, r in results.items():
        print(f"{prec:>9} {r['first_eval_loss']:10.4f} {r['eval_loss']:10.4f} {r['train_objective_tail']:21.4f} "
              f"{r['seconds']:8.1f}")
    print(f"relative gap |fp8 - bf16| / bf16 = {gap:.4%} (DeepSeek-V3 report: below {PAPER_GAP:.2%})")


if __name__ == "__main__":
    main()
