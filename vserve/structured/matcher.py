"""The engine side of structured outputs: compiling grammars, matching tokens, bitmasks.

``StructuredOutputs`` owns the llguidance tokenizer (built once from the model's
``tokenizer.json``), a one-thread compile pool and a cache of compiled grammars keyed by
their text. A request's matcher is a copy of the cached pristine one, so it compiles once
per distinct schema, on the pool's thread: llguidance drops the GIL while it compiles, so
the busy loop keeps stepping meanwhile. The pristine matcher is warmed first (``warm_up``)
so that its copies do not build lexer states inside engine steps.

Invariants the engine keeps: a constrained request enters the scheduler only once its
matcher exists (``EngineCore`` holds it until then); every token appended to its output has
been consumed by its matcher, in order (``Scheduler.update_from_output``), so the next
bitmask is always computed from the state after the last known token — which is why a step
with a constrained row samples only once the step before it is applied (its forward pass is
launched ahead: ``PendingOutput.deferred``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from llguidance import LLExecutor, LLMatcher, LLTokenizer
from tokenizers import Tokenizer

from vserve.protocol.sampling import StructuredOutput
from vserve.structured.grammar import grammar_text

logger = logging.getLogger(__name__)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask."""
    return (vocab_size + 31) // 32


def allowed_token(mask: np.ndarray, salt: int) -> int | None:
    """A token the int32 bitmask row ``mask`` allows, chosen by ``salt`` (any int >= 0): a
    word (the salt's, or where that allows nothing, one of those that allow some), then one
    of that word's tokens. None when the row allows nothing."""
    word = salt % len(mask)
    bits = int(mask[word]) & 0xFFFF_FFFF
    if not bits:  # a sparse mask: choose among the words with a token
        words = np.flatnonzero(mask)
        if not len(words):
            return None
        word = int(words[salt % len(words)])
        bits = int(mask[word]) & 0xFFFF_FFFF
    for _ in range((salt // len(mask)) % bits.bit_count()):
        bits &= bits - 1  # drop the lowest allowed token
    return word * 32 + (bits & -bits).bit_length() - 1


class StructuredOutputs:
    """Compiles grammars for one model's tokenizer. ``vocab_size``: the logits' width (may
    exceed the tokenizer's: padded embeddings), so bitmasks cover every logit."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: list[int],
                 cache_size: int = 256) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self._eos = eos_token_ids
        self._tokenizer: LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, LLMatcher] = {}
        self._cache_size = cache_size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self.compile_seconds_total = 0.0
        self.compiles = 0
        self.cache_hits = 0

    def tokenizer(self) -> LLTokenizer:
        """Built on first use (~0.1-1 s for a 128k vocabulary), on the compile thread."""
        if self._tokenizer is None:
            path = self.model_dir / "tokenizer.json"
            if not path.is_file():
                raise ValueError(f"structured outputs need {path} (a fast tokenizer)")
            text = path.read_text()
            # EOS ids the tokenizer itself does not know (ids of padded embedding rows)
            # cannot be named to llguidance.
            known = Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
            eos = [t for t in self._eos if t < known]
            # One EOS id (older llguidance takes no list); the others stop the request
            # through the scheduler's own EOS check as usual.
            self._tokenizer = LLTokenizer(text, n_vocab=self.vocab_size,
                                          eos_token=eos[0] if eos else None)
        return self._tokenizer

    def submit(self, so: StructuredOutput) -> Future[LLMatcher]:
        """A fresh matcher for ``so``, compiled (or copied from the cache) on the pool."""
        return self._pool.submit(self._matcher, so)

    def _matcher(self, so: StructuredOutput) -> LLMatcher:
        text = grammar_text(so)
        with self._lock:
            pristine = self._cache.get(text)
        if pristine is not None:
            self.cache_hits += 1
            return pristine.deep_copy()
        t0 = time.perf_counter()
        matcher = LLMatcher(self.tokenizer(), text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the {so.kind} constraint cannot be compiled: "
                             f"{' '.join(matcher.get_error().split())}")
        if not warm_up(matcher, self.vocab_size):  # never seen; a fresh one is sound
            logger.warning("grammar warm-up failed (%s); caching it cold", matcher.get_error())
            matcher = LLMatcher(self.tokenizer(), text, log_level=0)
        self.compile_seconds_total += time.perf_counter() - t0
        self.compiles += 1
        with self._lock:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[text] = matcher
        return matcher.deep_copy()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# Rollouts of a fresh grammar before it is cached (see ``warm_up``); measured on the 128k
# synthetic vocabulary: 64 rows of {"text": string} from the cache, a mask in the first
# dozen steps cost up to 0.3-2 ms per row without (a 12.5 ms engine step), 2-30 us with; one
# rollout of 16 tokens already gave most of it. A 20-property schema's costly masks are
# costly in any state (bounded strings, formats): warming does not help it, and its cold
# compile grows from ~4 to ~10-20 ms (on the compile thread).
_WARM_ROLLOUTS = 2
_WARM_TOKENS = 24
_WARM_SECONDS = 0.02


def warm_up(matcher: LLMatcher, vocab_size: int) -> bool:
    """Walk ``matcher`` through a few random rollouts of allowed tokens, computing each
    step's mask, and roll it back to where it started. The lexer states and token-mask
    work those steps need are built lazily and then kept by the matcher; a copy taken
    afterwards (every request's) inherits them, where a copy of a fresh matcher builds them
    again in its own first steps — inside an engine step. The grammar state is unchanged;
    False if it could not be restored (the matcher must then be dropped)."""
    mask = np.zeros(bitmask_width(vocab_size), dtype=np.int32)
    rng = np.random.default_rng(0)
    deadline = time.perf_counter() + _WARM_SECONDS
    for _ in range(_WARM_ROLLOUTS):
        taken = 0
        while taken < _WARM_TOKENS and not matcher.is_stopped():
            matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            token = allowed_token(mask, int(rng.integers(1 << 40)))
            if token is None or not matcher.consume_token(token):
                break
            taken += 1
        if taken and not matcher.rollback(taken):
            return False
        if time.perf_counter() > deadline:
            break
    return not matcher.is_error()


_CPUS = len(os.sched_getaffinity(0))
# Above this many rows, and with cores to spare, a synchronous fill runs on llguidance's
# threads; on a 2-core machine those threads only compete with torch's (measured: 16 rows
# of the demo model, 15.9% decode loss in parallel, 5.5% serially).
_SERIAL_ROWS = 8 if _CPUS >= 4 else 1 << 30
# llguidance's threads for masks. Few: on the 16-core H100 host (synthetic 128k vocabulary,
# {"text": string} mid-string, median per step), 64 masks took 232/208/316/392 us on
# 1/2/4/8 threads, 256 took 1,218/889/1,405/1,432 us: waking more threads costs more than
# the masks (2-30 us each) they share.
_MASK_THREADS = 2 if _CPUS >= 8 else 1
_BACKGROUND: ThreadPoolExecutor | None = None
_EXECUTOR: LLExecutor | None = None


def _executor() -> LLExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = LLExecutor(num_threads=_MASK_THREADS)
    return _EXECUTOR


def consume_tokens(pairs: list[tuple[LLMatcher, int]]) -> None:
    """Advance each matcher by its sampled token, in this thread. A token the grammar
    rejects leaves its matcher in the error state (``is_stopped()``), as ``consume_token``
    does. Serial on purpose: llguidance's ``consume_token_par`` was slower at every batch
    and thread count measured (16-core H100 host, 1-3 us per token: 64 rows 127 us serially,
    145/171/258/335 us on 1/2/4/8 threads; 256 rows 332 us against 562-1,178 us)."""
    for matcher, token in pairs:
        matcher.consume_token(token)


def fill_bitmask(matchers: list[LLMatcher], out: np.ndarray) -> None:
    """Row i of ``out`` (int32 ``[len(matchers), bitmask_width]``) ← the tokens
    ``matchers[i]`` allows next (bit ``t % 32`` of word ``t // 32``). Rows are computed in
    parallel, off the GIL, above a few rows on a machine with cores to spare."""
    assert out.dtype == np.int32 and out.flags["C_CONTIGUOUS"]
    assert out.shape[0] >= len(matchers)
    row_bytes = out.shape[1] * 4
    if len(matchers) <= _SERIAL_ROWS:
        # In this thread: a mask mid-string costs microseconds, waking the executor's threads
        # costs more.
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(out.ctypes.data + i * row_bytes, row_bytes)
        return
    _executor().unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                        out.ctypes.data, row_bytes, len(matchers))


def fill_bitmask_async(matchers: list[LLMatcher], out: np.ndarray) -> Future[None]:
    """``fill_bitmask`` on a helper thread, through llguidance's executor, which computes
    off the GIL: the caller's Python work goes on meanwhile (``LLMatcher``'s own
    ``unsafe_compute_mask_ptr`` holds the GIL). ``out`` must stay alive, and the matchers
    unchanged, until the future is done."""
    global _BACKGROUND
    assert out.dtype == np.int32 and out.flags["C_CONTIGUOUS"]
    assert out.shape[0] >= len(matchers)
    if _BACKGROUND is None:
        _BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
    executor = _executor()
    pairs = [(m, i) for i, m in enumerate(matchers)]
    ptr, row_bytes = out.ctypes.data, out.shape[1] * 4
    started = threading.Event()

    def fill() -> None:
        started.set()
        executor.unsafe_compute_mask_ptr(pairs, ptr, row_bytes, len(pairs))

    future = _BACKGROUND.submit(fill)
    # The helper needs the GIL to enter llguidance (which then drops it); waiting here hands
    # it over now, instead of after the interpreter's 5 ms switch interval of a busy caller.
    started.wait()
    return future
