"""The sampler's randomness: counter-based Gumbel noise, one key per row.

Sampling draws token ``argmax_t(x_t / T + g_t)`` with ``g_t`` standard Gumbel noise, which
picks ``t`` with probability ``softmax(x / T)_t`` (the Gumbel-max trick). The noise is not
drawn from a stateful generator: ``g_t`` is a fixed function of the row's 64-bit key and the
token id (two rounds of a 32-bit integer mixer, keyed by the key's halves), so a whole batch
needs one kernel launch (``vserve.ops.sampling.gumbel_argmax`` on CUDA) whatever mix of
seeded and unseeded rows it holds, and no softmax at all.

A seeded request's key for its n-th sampled token is ``seeded_key(seed, n)``: the same seed
gives the same tokens whatever else the batch holds, on every device of one kind (CPU and
CUDA compute the logarithms with different roundings, so they may differ on near-ties). An
unseeded row's key comes from the engine's own seeded stream.

``gumbel_noise`` is the definition (numpy on the host, the CPU path); the CUDA kernel
computes the same integers and is tested against it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

_M64 = 0xFFFF_FFFF_FFFF_FFFF
# Chris Wellons' "lowbias32" multipliers: a 32-bit mixer with low avalanche bias.
MIX_A = 0x7FEB352D
MIX_B = 0x846CA68B


def _splitmix64(x: int) -> int:
    x = (x + 0x9E37_79B9_7F4A_7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58_476D_1CE4_E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D0_49BB_1331_11EB) & _M64
    return x ^ (x >> 31)


def seeded_key(seed: int, draw: int) -> int:
    """The key of a seeded request's ``draw``-th sampled token, as a signed int64 value."""
    return to_int64(_splitmix64(_splitmix64(seed & _M64) ^ (draw & _M64)))


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """``_splitmix64`` over a uint64 array (numpy's uint64 arithmetic wraps)."""
    x = x + np.uint64(0x9E37_79B9_7F4A_7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58_476D_1CE4_E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D0_49BB_1331_11EB)
    return x ^ (x >> np.uint64(31))


def seeded_keys(seeds: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``seeded_key`` for uint64 arrays of seeds (taken modulo 2^64) and draw numbers, as
    int64."""
    return (_splitmix64_array(_splitmix64_array(seeds) ^ draws)).view(np.int64)


def to_int64(key: int) -> int:
    """A 64-bit pattern as the signed value an int64 tensor holds."""
    key &= _M64
    return key - (1 << 64) if key >> 63 else key


def _mix32_(h: np.ndarray) -> None:
    """lowbias32, in place on uint32 (numpy's uint32 products wrap, its shifts are logical;
    numpy rather than torch: fewer passes and far less per-call overhead on small rows)."""
    h ^= h >> 16
    h *= np.uint32(MIX_A)
    h ^= h >> 15
    h *= np.uint32(MIX_B)
    h ^= h >> 16


def _uniform(keys: np.ndarray, vocab: int) -> np.ndarray:
    k = keys.view(np.uint64)
    k0 = (k & 0xFFFF_FFFF).astype(np.uint32)[:, None]
    k1 = (k >> 32).astype(np.uint32)[:, None]
    h = _token_ids(vocab) ^ k0
    _mix32_(h)
    h ^= k1
    _mix32_(h)
    h >>= 9
    # (2 * (h >> 9) + 1) * 2^-24, exact in float32, in one multiply-add.
    u = h.astype(np.float32)
    u *= np.float32(2.0 ** -23)
    u += np.float32(2.0 ** -24)
    return u


@functools.lru_cache(maxsize=8)
def _token_ids(vocab: int) -> np.ndarray:
    ids = np.arange(vocab, dtype=np.uint32)[None, :]
    ids.flags.writeable = False
    return ids


def _gumbel(keys: np.ndarray, vocab: int) -> np.ndarray:
    g = _uniform(keys, vocab)
    np.log(g, out=g)
    np.negative(g, out=g)
    np.log(g, out=g)
    return np.negative(g, out=g)


def uniform_from_hash(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, vocab]`` float32 uniforms in (0, 1) for int64 CPU ``keys`` ``[B]``: odd
    multiples of 2^-24, never 0 or 1, so both logarithms of the Gumbel transform stay
    finite."""
    return torch.from_numpy(_uniform(keys.numpy(), vocab))


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, vocab]`` float32 standard Gumbel noise for int64 CPU ``keys`` ``[B]``."""
    return torch.from_numpy(_gumbel(keys.numpy(), vocab))


def _allowed(words: np.ndarray, vocab: int) -> np.ndarray:
    """bool ``[R, vocab]``: bit ``t % 32`` of word ``t // 32`` of each row of the int32
    bitmask ``words`` ``[R, width]`` (the grammar allows token ``t``)."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1,
                         bitorder="little")[:, :vocab]
    return bits != 0


def banned_tokens(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool ``[R, vocab]``: True where bit ``t % 32`` of word ``t // 32`` of a row of the
    int32 bitmask ``words`` ``[R, width]`` is clear (the grammar forbids token ``t``)."""
    if words.device.type == "cpu":
        return torch.from_numpy(~_allowed(words.numpy(), vocab))
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.view(words.shape[0], -1)[:, :vocab] == 0


def gumbel_argmax(x: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor,
                  masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Row-wise ``argmax(x / T + g)`` → int64 ``[B]``; a row whose temperature is 0 takes
    ``argmax(x)`` (no noise). ``x``: ``[B, V]`` scores (logits, or log-probabilities after
    filtering; ``-inf`` marks a banned token); ``temperature`` float32 ``[B]``; ``keys``
    int64 ``[B]``. ``masks``: ``(words, mask_row)``, int32 token bitmasks ``[R, ceil(V /
    32)]`` (bit ``t % 32`` of word ``t // 32`` set: token ``t`` allowed) and for each row of
    ``x`` the bitmask row that applies to it, or -1. Ties resolve to the lowest index."""
    if x.is_cuda:
        from vserve.ops import use_kernels

        if use_kernels(x):
            from vserve.ops.sampling import gumbel_argmax as kernel

            return kernel(x, temperature, keys, masks)
    xs = x if x.device.type == "cpu" and x.dtype == torch.float32 else x.to("cpu", torch.float32)
    chosen = torch.from_numpy(_host_gumbel_argmax(
        xs.numpy(), temperature.cpu().numpy(), keys.cpu().numpy(),
        None if masks is None else (masks[0].cpu().numpy(), masks[1].cpu().numpy())))
    return chosen if x.device.type == "cpu" else chosen.to(x.device)


def _host_gumbel_argmax(x: np.ndarray, t: np.ndarray, keys: np.ndarray,
                        masks: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The CPU path, in numpy: a row costs a few microseconds of calls at a small
    vocabulary (torch's per-operator overhead is several times that)."""
    vocab = x.shape[1]
    noisy = np.flatnonzero(t > 0)
    if noisy.size == x.shape[0]:
        scores = x / t[:, None]
        scores += _gumbel(keys, vocab)
    else:
        scores = x.copy()
        if noisy.size:
            scores[noisy] = x[noisy] / t[noisy, None] + _gumbel(keys[noisy], vocab)
    if masks is not None:
        words, mask_row = masks
        rows = np.flatnonzero(mask_row >= 0)
        scores[rows] = np.where(_allowed(words[mask_row[rows]], vocab), scores[rows],
                                np.float32(-np.inf))
    return scores.argmax(axis=1)
