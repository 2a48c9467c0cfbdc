"""Token streams and batches of fixed-length windows over them.

The trainer asks for `window = seq_len + 1 + mtp_depth` tokens per row, so the inputs and every
shifted target (next token, and the MTP modules' further tokens) are slices of one row.
"""
from __future__ import annotations

import numpy as np

from dsv3_jax.data.tokenizer import Tokenizer


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """One int32 stream: the documents' tokens with `eos_id` between consecutive documents."""
    encode_batch = getattr(tokenizer, "encode_batch", None)  # HFTokenizer encodes in parallel
    encoded = encode_batch(docs) if encode_batch else [tokenizer.encode(d) for d in docs]
    eos = np.array([tokenizer.eos_id], np.int32)
    parts = []
    for i, ids in enumerate(encoded):
        if i:
            parts.append(eos)
        parts.append(np.asarray(ids, np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def _num_windows(tokens: np.ndarray, window: int) -> int:
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window = {window!r}: must be a positive integer")
    n = len(tokens) // window
    if n == 0:
        raise ValueError(f"the token stream has {len(tokens)} tokens, fewer than one window of {window}; "
                         "use more text or a shorter seq_len")
    return n


def _gather(tokens: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    return tokens[offsets[:, None] + np.arange(window)].astype(np.int32)


class BatchIterator:
    """Shuffled, resumable batches of `window`-token rows, each process taking its share.

    The stream is cut into `num_windows` non-overlapping windows (offsets k * window). Epoch e
    visits them in a permutation fixed by (seed, e) alone; batches are consecutive runs of
    `batch_size` rows of that endless sequence, so a batch may straddle two epochs and a stream with
    fewer windows than `batch_size` still works. Process i of P returns rows
    [i * B/P, (i+1) * B/P) of each global batch: the P processes together see exactly the batch one
    process would. The position (epoch, row within it) is global, so `state()` is the same on every
    process and can be restored under a different process count or batch size.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, window: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.tokens = np.asarray(tokens, np.int32)
        self.num_windows = _num_windows(self.tokens, window)
        _check_split(batch_size, process_index, process_count)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed = {seed!r}: must be a non-negative integer")
        self.batch_size, self.window, self.seed = batch_size, window, int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self._epoch, self._row = 0, 0
        self._perm_epoch, self._perm = -1, np.zeros((0,), np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        # Cached: a batch asks for the same epoch's order once per row.
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_windows), epoch
        return self._perm

    def _take(self, count: int) -> np.ndarray:
        """Window indices of the next `count` global rows, advancing the position past them."""
        out = []
        while len(out) < count:
            perm = self._permutation(self._epoch)
            stop = min(self.num_windows, self._row + count - len(out))
            out.extend(perm[self._row:stop])
            self._row = stop
            if self._row == self.num_windows:
                self._epoch, self._row = self._epoch + 1, 0
        return np.asarray(out, np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        """This process's rows of the next global batch: int32 [batch_size // process_count, window]."""
        rows = self._take(self.batch_size)
        lo = self.process_index * self.local_batch_size
        return _gather(self.tokens, rows[lo:lo + self.local_batch_size] * self.window, self.window)

    next = __next__

    @property
    def epoch(self) -> float:
        """Epochs completed, fractional: how far through the data training has read."""
        return self._epoch + self._row / self.num_windows

    def state(self) -> dict:
        """The position as plain ints (JSON-serialisable), plus what it is only valid for."""
        return {"epoch": self._epoch, "row": self._row, "seed": self.seed,
                "window": self.window, "num_windows": self.num_windows}

    def restore(self, state: dict) -> None:
        """Continue from `state()`: the following batches equal those of an uninterrupted run."""
        for key in ("seed", "window", "num_windows"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"BatchIterator.restore: saved {key} = {state[key]} but this iterator "
                                 f"has {getattr(self, key)}; the data or settings changed since the save")
        epoch, row = int(state["epoch"]), int(state["row"])
        if epoch < 0 or not 0 <= row < self.num_windows:
            raise ValueError(f"BatchIterator.restore: position epoch={epoch}, row={row} is out of range")
        self._epoch, self._row = epoch, row


def _check_split(batch_size: int, process_index: int, process_count: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r}: must be a positive integer")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index = {process_index}, process_count = {process_count}: "
                         "need 0 <= process_index < process_count")
    if batch_size % process_count:
        raise ValueError(f"batch_size = {batch_size} is not divisible by process_count = {process_count}; "
                         "each process must take an equal share of the global batch")


def eval_batches(tokens: np.ndarray, batch_size: int, window: int, num_batches: int) -> list[np.ndarray]:
    """A fixed set of held-out batches, int32 [batch_size, window] each, the same on every call.

    Rows are non-overlapping windows spread evenly over the stream. If the stream holds fewer than
    `num_batches * batch_size` windows, fewer batches come back; if it holds fewer than
    `batch_size`, one batch of evenly spaced windows that overlap (a noisier estimate, but the
    batch shape stays fixed so the eval step is compiled once).
    """
    tokens = np.asarray(tokens, np.int32)
    n = _num_windows(tokens, window)
    if batch_size < 1 or num_batches < 1:
        raise ValueError(f"batch_size = {batch_size}, num_batches = {num_batches}: both must be >= 1")
    if n < batch_size:
        # Starts from 0 to the last possible one, evenly; repeats are possible for tiny streams.
        offsets = np.arange(batch_size) * (len(tokens) - window) // max(batch_size - 1, 1)
        return [_gather(tokens, offsets, window)]
    count = min(num_batches, n // batch_size) * batch_size
    offsets = (np.arange(count) * n // count) * window
    return [_gather(tokens, o, window) for o in offsets.reshape(-1, batch_size)]
