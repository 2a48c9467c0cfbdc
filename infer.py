"""Generate text from a trained or imported DeepSeek-V3-shaped model, over the latent KV cache.

    python infer.py --checkpoint workdir --prompt "def main(" [--speculative mtp] [--weights fp8] [--kv_cache fp8]
        [--json]

--checkpoint takes a training workdir, an export directory or a Hugging Face directory (detected).
Text streams as it is generated; --json ends with one line of JSON (text, tokens, speeds, cache bytes).
--kv_cache fp8 stores the latent cache packed in FP8 (656 bytes a token and layer for V3, 1,152 in bf16).
"""
from absl import app, flags

from dsv3_jax.infer import cli

cli.define_flags()

if __name__ == "__main__":
    app.run(lambda argv: cli.main(argv, flags.FLAGS))
