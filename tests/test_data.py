"""The data package: corpus files, splits, tokenizers, resumable and process-sharded batches."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsv3_jax.data import (
    BatchIterator,
    ByteTokenizer,
    default_corpus_files,
    eval_batches,
    load_tokenizer,
    read_documents,
    resolve_files,
    split_documents,
    tokenize_documents,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = "def héllo(wörld):\n    return '日本語 — ünïcode ✓'  # tabs\tand  spaces\n\n"


def _write(root, name, text):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@pytest.fixture
def small_corpus(tmp_path):
    """Three text files over two folders, plus a binary file a folder walk must skip."""
    root = str(tmp_path / "corpus")
    texts = [f"document {i}: " + " ".join(f"word{j % 17} the cat sat" for j in range(40 + i)) for i in range(3)]
    paths = [_write(root, "a.txt", texts[0]), _write(root, "b.md", texts[1]), _write(root, "sub/c.py", texts[2])]
    with open(os.path.join(root, "blob.bin"), "wb") as f:
        f.write(bytes(range(256)))
    return root, paths, texts


# ---- corpus -------------------------------------------------------------------------------------

def test_default_corpus_is_the_stdlib_and_deterministic():
    files = default_corpus_files()
    assert files == default_corpus_files() and files == sorted(files)
    assert len(files) > 100 and all(f.endswith(".py") and os.path.isfile(f) for f in files)
    stdlib = os.path.dirname(os.path.abspath(os.__file__))
    assert os.path.join(stdlib, "os.py") in files
    assert not any(f"{os.sep}site-packages{os.sep}" in f or f"{os.sep}test{os.sep}" in f for f in files)
    assert sum(len(d) for d in read_documents(files[:20])) > 0


def test_resolve_file_dir_and_glob(small_corpus):
    root, (a, b, c), _ = small_corpus
    assert resolve_files([a]) == [a]
    assert resolve_files([root]) == [a, b, c]  # walked, sorted; blob.bin is not text-like
    assert resolve_files([os.path.join(root, "*.txt")]) == [a]
    assert resolve_files([os.path.join(root, "**", "*.py")]) == [c]
    assert resolve_files([b, root]) == [b, a, c]  # spec order kept, repeats dropped
    assert resolve_files(a) == [a]  # a bare string is one spec, not a list of characters


def test_resolve_missing_spec_names_it(small_corpus):
    root, (a, _, _), _ = small_corpus
    missing = os.path.join(root, "nope", "*.txt")
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_files([a, missing])


def test_empty_corpus_is_an_error(tmp_path):
    files = [_write(str(tmp_path), "empty.txt", ""), _write(str(tmp_path), "blank.txt", " \n\t\n")]
    with pytest.raises(ValueError, match="corpus is empty"):
        read_documents(files)


def test_read_drops_blank_files_and_keeps_text(small_corpus, tmp_path):
    _, paths, texts = small_corpus
    blank = _write(str(tmp_path), "blank.txt", "\n\n")
    assert read_documents([paths[0], blank, paths[1]]) == [texts[0], texts[1]]


def test_split_is_deterministic_by_content_and_both_sides_nonempty():
    docs = [f"doc {i} " * (i + 1) for i in range(200)]
    train, held = split_documents(docs, 0.1)
    assert (train, held) == split_documents(docs, 0.1)
    assert sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert 5 <= len(held) <= 40  # about 10% of 200
    # By content, not position: reversing the input reverses each side, nothing moves across.
    r_train, r_held = split_documents(docs[::-1], 0.1)
    assert r_train == train[::-1] and r_held == held[::-1]
    # Order-independent and stable across interpreter runs (PYTHONHASHSEED differs per process).
    code = ("from dsv3_jax.data import split_documents as s\n"
            "print(s([f'doc {i} ' * (i + 1) for i in range(200)], 0.1)[1])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(held)


@pytest.mark.parametrize("fraction", [1e-6, 0.999999])
def test_split_never_leaves_a_side_empty(fraction):
    docs = ["alpha", "beta", "gamma"]
    train, held = split_documents(docs, fraction)
    assert train and held and sorted(train + held) == sorted(docs)


def test_split_single_document_by_characters():
    doc = "x" * 90 + "y" * 10
    assert split_documents([doc], 0.1) == (["x" * 90], ["y" * 10])
    assert split_documents(["ab"], 0.01) == (["a"], ["b"])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents([doc], 0.0)
    with pytest.raises(ValueError, match="no documents"):
        split_documents([], 0.1)


# ---- tokenizers ---------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and len(ids) > len(SAMPLE)  # multi-byte characters
    assert tok.decode(ids) == SAMPLE and (tok.vocab_size, tok.eos_id) == (256, 0)
    assert 0 not in ids
    assert tok.decode(ids[:-1] + [0xE6]) == SAMPLE[:-1] + "\ufffd"  # a cut character, not a crash
    with pytest.raises(ValueError, match="256|byte"):
        tok.decode([300])


def test_load_tokenizer_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_train_bpe_round_trip(small_corpus, tmp_path):
    pytest.importorskip("tokenizers")
    from dsv3_jax.data import train_bpe

    _, paths, texts = small_corpus
    out = str(tmp_path / "tok" / "tokenizer.json")
    trained = train_bpe(paths, 300, out)
    tok = load_tokenizer(out)
    assert tok.vocab_size == trained.vocab_size and 257 < tok.vocab_size <= 300
    assert tok.decode(tok.encode("<|endoftext|>")) == "<|endoftext|>" and tok.encode("<|endoftext|>") == [tok.eos_id]
    assert load_tokenizer(os.path.dirname(out)).vocab_size == tok.vocab_size  # a folder holding it
    for text in [texts[0], SAMPLE, " leading and trailing  \n"]:
        assert tok.decode(tok.encode(text)) == text
    # Merges were learned: the training text takes far fewer tokens than bytes.
    assert len(tok.encode(texts[0])) < len(texts[0].encode()) / 2
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(paths, 100, str(tmp_path / "small.json"))


def test_tokenizer_command_line(small_corpus, tmp_path):
    pytest.importorskip("tokenizers")
    root, _, texts = small_corpus
    out = str(tmp_path / "cli.json")
    cmd = [sys.executable, "-m", "dsv3_jax.data.tokenizer", "--files", os.path.join(root, "*.txt"),
           os.path.join(root, "sub"), "--vocab_size", "280", "--out", out]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr and "wrote" in res.stdout
    with open(out) as f:
        assert "<|endoftext|>" in f.read()
    tok = load_tokenizer(out)
    assert tok.vocab_size <= 280 and tok.decode(tok.encode(texts[2])) == texts[2]
    bad = subprocess.run(cmd[:4] + [os.path.join(root, "none*.txt"), "--out", out], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "none*.txt" in bad.stderr


# ---- token stream and batches -------------------------------------------------------------------

def test_tokenize_documents_puts_eos_between_documents():
    stream = tokenize_documents(["ab", "é", "c"], ByteTokenizer())
    assert stream.dtype == np.int32
    np.testing.assert_array_equal(stream, [97, 98, 0, 0xC3, 0xA9, 0, 99])


def _stream(n=1000):
    return np.arange(n, dtype=np.int32)  # token == position, so a row shows where it came from


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_batches_shape_dtype_and_rows_are_windows():
    it = BatchIterator(_stream(), batch_size=4, window=10, seed=0)
    batch = next(it)
    assert batch.shape == (4, 10) and batch.dtype == np.int32
    starts = batch[:, 0]
    assert np.all(starts % 10 == 0)  # non-overlapping offsets, stride = window
    np.testing.assert_array_equal(batch, starts[:, None] + np.arange(10))


def test_each_epoch_visits_every_window_once():
    it = BatchIterator(_stream(1005), batch_size=5, window=10, seed=3)  # 100 windows, tail dropped
    epochs = [np.concatenate(_take(it, 20))[:, 0] for _ in range(2)]
    for starts in epochs:
        np.testing.assert_array_equal(np.sort(starts), np.arange(0, 1000, 10))
    assert not np.array_equal(epochs[0], epochs[1])  # a new permutation each epoch
    assert it.epoch == 2.0


def test_batches_are_deterministic_given_seed_and_differ_across_seeds():
    a = _take(BatchIterator(_stream(), 4, 10, seed=7), 5)
    b = _take(BatchIterator(_stream(), 4, 10, seed=7), 5)
    c = _take(BatchIterator(_stream(), 4, 10, seed=8), 5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_resume_from_state_equals_uninterrupted_across_epochs():
    # 23 windows and batches of 4: epochs end mid-batch, so batches straddle the boundary.
    def make():
        return BatchIterator(_stream(230), batch_size=4, window=10, seed=5)

    full = _take(make(), 20)
    it = make()
    _take(it, 5)
    saved = json.loads(json.dumps(it.state()))  # the state must survive JSON
    assert all(type(v) is int for v in saved.values())
    resumed = make()
    resumed.restore(saved)
    rest = _take(resumed, 15)
    assert all(np.array_equal(x, y) for x, y in zip(full[5:], rest))
    assert resumed.epoch > 2  # the compared batches crossed several epoch boundaries


def test_processes_together_see_the_single_process_batch():
    single = _take(BatchIterator(_stream(), 8, 10, seed=1), 6)
    shards = [_take(BatchIterator(_stream(), 8, 10, seed=1, process_index=i, process_count=2), 6)
              for i in range(2)]
    assert shards[0][0].shape == (4, 10)
    for k in range(6):
        np.testing.assert_array_equal(np.concatenate([shards[0][k], shards[1][k]]), single[k])


def test_state_is_global_so_restore_works_under_another_process_count():
    one = BatchIterator(_stream(), 8, 10, seed=2)
    _take(one, 3)
    two = BatchIterator(_stream(), 8, 10, seed=2, process_index=1, process_count=2)
    two.restore(one.state())
    np.testing.assert_array_equal(next(two), next(one)[4:])


def test_batch_iterator_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        BatchIterator(_stream(9), 2, 10, seed=0)
    with pytest.raises(ValueError, match="not divisible by process_count"):
        BatchIterator(_stream(), 6, 10, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        BatchIterator(_stream(), 4, 10, seed=0, process_index=2, process_count=2)
    it = BatchIterator(_stream(), 4, 10, seed=0)
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(_stream(), 4, 10, seed=1).restore(it.state())
    with pytest.raises(ValueError, match="num_windows"):
        BatchIterator(_stream(500), 4, 10, seed=0).restore(it.state())


def test_small_stream_still_batches():
    # 3 windows but 4 rows a batch: rows wrap into the next epoch instead of failing.
    batch = next(BatchIterator(_stream(30), 4, 10, seed=0))
    assert batch.shape == (4, 10) and set(batch[:3, 0]) == {0, 10, 20}


def test_eval_batches_fixed_even_and_bounded():
    batches = eval_batches(_stream(), batch_size=4, window=10, num_batches=5)
    assert len(batches) == 5 and all(b.shape == (4, 10) and b.dtype == np.int32 for b in batches)
    starts = np.concatenate(batches)[:, 0]
    np.testing.assert_array_equal(starts, np.arange(20) * 50)  # 100 windows, every 5th
    again = eval_batches(_stream(), 4, 10, 5)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))
    assert len(eval_batches(_stream(100), 4, 10, 5)) == 2  # 10 windows: two full batches
    short = eval_batches(_stream(25), 4, 10, 5)  # 2 windows < one batch: one overlapping batch
    assert len(short) == 1 and short[0].shape == (4, 10)
    assert short[0][0, 0] == 0 and short[0][-1, -1] == 24  # spans the whole stream
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_batches(_stream(5), 4, 10, 5)


def test_end_to_end_on_the_default_corpus_slice():
    docs = read_documents(default_corpus_files()[:10])
    train, held = split_documents(docs, 0.2)
    tok = ByteTokenizer()
    it = BatchIterator(tokenize_documents(train, tok), 4, 33, seed=0)
    batch = next(it)
    assert batch.shape == (4, 33) and batch.max() < tok.vocab_size
    assert eval_batches(tokenize_documents(held, tok), 4, 33, 2)[0].shape == (4, 33)
