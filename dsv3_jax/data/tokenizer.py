"""Tokenizers: raw UTF-8 bytes, or a Hugging Face `tokenizer.json` (trained here or downloaded).

Both satisfy `Tokenizer`: `vocab_size`, `eos_id`, `encode`, `decode` (the second through the
`tokenizers` library, a dependency of the package).

Train a byte-level BPE on your files (default: the standard-library corpus):

    python -m dsv3_jax.data.tokenizer --files 'data/*.txt' --vocab_size 4096 --out tok.json
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Protocol, runtime_checkable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dsv3_jax.data.corpus import default_corpus_files, read_documents, resolve_files

ENDOFTEXT = "<|endoftext|>"
# Spellings of end-of-text in common tokenizer.json files, in order of preference.
EOS_CANDIDATES = (ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """One token per UTF-8 byte: 256 ids, no training, no unknown tokens.

    The end-of-text id is 0, the NUL byte, since NUL does not occur in text files; that keeps the
    vocabulary at exactly 256 instead of adding a 257th id. (A text that does contain NUL would see
    it read as a document boundary, nothing worse.)
    """

    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A model's sample can split a multi-byte character; show U+FFFD rather than fail.
        try:
            data = bytes(int(i) for i in ids)
        except ValueError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < 256)
            raise ValueError(f"ByteTokenizer.decode: id {bad} is not a byte (0..255)") from None
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, encoded without added special tokens (BOS and the like):
    the data pipeline places end-of-text itself."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises a bare Exception for any bad file
            raise ValueError(f"tokenizer {path}: not a Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _find_eos(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once; the library spreads them over threads (tokenize_documents uses it)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        # Special tokens are kept so an end-of-text in a sample stays visible.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _find_eos(tok) -> int:
    for name in EOS_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return 0


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """"byte", or a `tokenizer.json` path (or a folder holding one, as a Hugging Face model has)."""
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer {spec!r}: no such tokenizer.json; pass 'byte' or a Hugging Face tokenizer.json "
            "(train one with: python -m dsv3_jax.data.tokenizer --out tok.json)")
    return HFTokenizer(path)


def train_bpe(files: list[str], vocab_size: int, out_path: str) -> HFTokenizer:
    """Trains a byte-level BPE (GPT-2 style) on `files`, saves it to `out_path`, returns it loaded.

    Byte-level pre-tokenisation makes the 256 byte symbols the base alphabet, so every text encodes
    and decodes back exactly; "<|endoftext|>" is the one special token and the end-of-text id.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size = {vocab_size}: a byte-level BPE needs at least "
                         f"{len(alphabet) + 1} (256 bytes + {ENDOFTEXT})")
    docs = read_documents(files)
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tok.save(out_path)
    return HFTokenizer(out_path)


def main(argv: list[str] | None = None) -> HFTokenizer:
    parser = argparse.ArgumentParser(prog="python -m dsv3_jax.data.tokenizer",
                                     description="Train a byte-level BPE tokenizer.json.")
    parser.add_argument("--files", nargs="+", default=None,
                        help="files, folders or glob patterns (default: the standard-library corpus)")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--out", required=True, help="where to write tokenizer.json")
    args = parser.parse_args(argv)
    try:
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a directory; give the path of the tokenizer.json to write")
        files = resolve_files(args.files) if args.files else default_corpus_files()
        tok = train_bpe(files, args.vocab_size, args.out)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{parser.prog}: {e}")
    print(f"trained a {tok.vocab_size}-token BPE on {len(files)} file(s); eos_id {tok.eos_id}; "
          f"wrote {args.out}")
    return tok


if __name__ == "__main__":
    main()
