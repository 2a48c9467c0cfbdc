"""Training data: corpus files -> documents -> token stream -> shuffled, resumable batches.

`corpus` finds and splits the text (default: the Python standard library's source, present on
every machine), `tokenizer` turns it into ids (raw bytes or a byte-level BPE `tokenizer.json`),
`batches` cuts the stream into `window`-token rows for training and held-out evaluation.
"""
import importlib

# Re-exports are resolved on first use (PEP 562) rather than imported here: importing
# `tokenizer` eagerly would make `python -m dsv3_jax.data.tokenizer` run a module that is
# already in sys.modules, which runpy warns about.
_EXPORTS = {
    "default_corpus_files": "corpus", "resolve_files": "corpus", "read_documents": "corpus",
    "split_documents": "corpus",
    "Tokenizer": "tokenizer", "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer", "train_bpe": "tokenizer",
    "tokenize_documents": "batches", "BatchIterator": "batches", "eval_batches": "batches",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
