"""Train a DeepSeek-V3-shaped model. With no flags: the `tiny` preset on the Python standard
library's source, a few minutes on 2 CPU cores, then a checkpoint, plots and a short sample.
Running the same command again resumes from the workdir's last checkpoint."""
from absl import app, flags

from dsv3_jax.train import cli

flags.DEFINE_string("config", "tiny", "preset name (configs/*.json) or a path to a ModelConfig JSON file")
flags.DEFINE_string("workdir", "workdir", "where checkpoints, metrics.jsonl, TensorBoard events and plots go")
flags.DEFINE_multi_string("data", [], "text files, directories or globs (default: the stdlib's source)")
flags.DEFINE_string("tokenizer", "byte", "'byte' or a path to a Hugging Face tokenizer.json")
flags.DEFINE_integer("steps", 500, "total optimizer steps (a resumed run continues up to this)")
flags.DEFINE_integer("batch_size", 16, "sequences per step")
flags.DEFINE_integer("seq_len", 128, "tokens per sequence")
flags.DEFINE_float("lr", 3e-3, "peak learning rate")
flags.DEFINE_integer("warmup_steps", 20, "linear warmup steps before the cosine decay")
flags.DEFINE_integer("seed", 0, "seed for the initialisation and the batch order")
flags.DEFINE_integer("checkpoint_every", 100, "steps between checkpoints (0: only at the end)")
flags.DEFINE_integer("eval_every", 50, "steps between held-out evaluations")
flags.DEFINE_integer("stop_after", None, "stop after this many steps of this invocation (resume later)")
flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16"], "activation precision (master weights stay fp32)")

if __name__ == "__main__":
    app.run(lambda argv: cli.main(argv, flags.FLAGS))
