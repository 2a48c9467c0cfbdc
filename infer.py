"""Generate text from a trained or imported DeepSeek-V3-shaped model, over the latent KV cache.

    python infer.py --checkpoint workdir --prompt "def main(" [--speculative mtp] [--weights fp8] [--json]

--checkpoint takes a training workdir, an export directory or a Hugging Face directory (detected).
Text streams as it is generated; --json ends with one line of JSON (text, tokens, speeds, cache bytes).
"""
from absl import app, flags

from dsv3_jax.infer import cli

cli.define_flags()

if __name__ == "__main__":
    app.run(lambda argv: cli.main(argv, flags.FLAGS))
