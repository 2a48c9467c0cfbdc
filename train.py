"""Train a DeepSeek-V3-shaped model. With no flags: the `tiny` preset on the Python standard
library's source, a few minutes on 2 CPU cores, then a checkpoint, plots and a short sample.
Running the same command again resumes from the workdir's last checkpoint."""
from absl import app, flags

from dsv3_jax.ops.sparse_attention import DSA_STAGES
from dsv3_jax.parallel.distributed import HEARTBEAT_TIMEOUT_S, INITIALIZATION_TIMEOUT_S
from dsv3_jax.runtime import choices
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
flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16", "fp8"],
                  "fp32; bf16 activations; or fp8: bf16 plus E4M3 GEMMs (Fprop, Dgrad, Wgrad) in the linear layers, "
                  "1x128 activation and 128x128 weight scales, FP32 accumulation (embedding, head, router, norms "
                  "and attention core stay bf16 or fp32); master weights stay fp32 in all three")
flags.DEFINE_enum("experts", "auto", list(choices("experts")),
                  "how the routed experts run (all compute the same function): auto picks per platform and shape")
flags.DEFINE_enum("attention", "auto", list(choices("attention")),
                  "how MLA attends (all compute the same function): auto picks per platform and shape")
flags.DEFINE_enum("remat", "none", list(choices("remat")),
                  "what a training step keeps for the backward and recomputes (same gradients, less memory): "
                  "none, full (each block keeps its input), save_attention, save_dots, offload_attention")
flags.DEFINE_bool("scan_layers", False, "compile each stack of layers (dense, MoE) once, as a scan: compile time "
                  "independent of depth; checkpoints hold the layers stacked (export and infer read either)")
flags.DEFINE_enum("dsa_stage", None, list(DSA_STAGES),
                  "DeepSeek-V3.2 training stage, for configs with an indexer: warmup trains the indexer alone (KL to "
                  "the dense attention), sparse trains everything over the indexer's top-k keys")
flags.DEFINE_integer("grad_accum", 1, "microbatches per optimizer step (gradients averaged; --batch_size divides)")
flags.DEFINE_enum("moments", "auto", ["auto", "float32", "bfloat16"],
                  "AdamW moments' dtype; auto: bfloat16 (as DeepSeek-V3 trains) from 1B parameters, else float32")
flags.DEFINE_integer("sample_tokens", 160, "tokens of text to sample at the end (0: none); with several processes "
                     "the whole model is gathered onto every host for it")
flags.DEFINE_string("mesh", "", "device mesh, e.g. 'data=2,expert=4' over the axes data, fsdp, expert, tensor "
                    "(sizes multiply to the device count); empty: one device, or all on data with several processes")
flags.DEFINE_string("coordinator_address", None, "multi-process runs: host:port of process 0, the same for all")
flags.DEFINE_integer("num_processes", None, "multi-process runs: how many processes take part")
flags.DEFINE_integer("process_id", None, "multi-process runs: this process's index, 0 .. num_processes - 1")
flags.DEFINE_integer("initialization_timeout", INITIALIZATION_TIMEOUT_S,
                     "multi-process runs: seconds to wait for every process to join")
flags.DEFINE_integer("heartbeat_timeout", HEARTBEAT_TIMEOUT_S,
                     "multi-process runs: seconds of silence after which a process is declared dead")

if __name__ == "__main__":
    app.run(lambda argv: cli.main(argv, flags.FLAGS))
