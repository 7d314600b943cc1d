"""Argument checks shared by the GPU ``Buffer`` and the NumPy reference backend.

Every check works on NumPy and CuPy arrays alike: shape, dtype and contiguity are read
through ``.shape`` / ``.dtype`` / ``.ndim`` / ``.flags.c_contiguous``; value checks (for
example that every expert id is in range) use the array's own reductions (``.min()``,
``.max()``, ``.sum()``), so on CuPy arrays they synchronise the device. A caller that must
not synchronise (CUDA-graph capture) can skip the value checks (``check_values=False``
where offered, or by not calling :func:`check_topk_range`).

Each check raises, before any communication starts:

- ``TypeError`` for a wrong type or dtype,
- ``ValueError`` for a wrong shape, contiguity, value or size,

with a message that starts with the argument's name, e.g.
``"topk_idx: expected int64 or int32, got float32"``. Checks return what they found
(sizes, flags) so that callers need not read it again.

Checks that depend on a buffer's geometry (``check_normal_capacity``, ``check_ll_capacity``) and
the size hints read :mod:`cupy_ep.geometry`, the formulas the GPU engines use, so that the
reference backend refuses exactly what the GPU would.

This module imports NumPy, ml_dtypes and cupy_ep's pure-Python modules only (never CuPy, never
an engine).
"""

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np

from . import geometry, limits

__all__ = [
    "BF16_DTYPE", "FP8_DTYPE", "FP8_BLOCK",
    "is_array", "is_bf16_dtype", "is_fp8_dtype",
    "check_int", "check_array", "check_num_experts", "check_topk_idx", "check_topk_range",
    "check_topk_weights", "check_x", "check_bias", "check_expert_alignment",
    "check_num_worst_tokens", "check_layout_args", "check_cumulative_stats", "check_wait_stats",
    "check_num_max_dispatch_tokens_per_rank", "check_ll_dispatch_args", "check_ll_handle",
    "check_ll_combine_args", "check_out", "check_buffer_args", "check_num_sms", "check_enable_shrink",
    "check_shrink_call", "check_mask_update", "check_same_on_every_rank",
    "check_internode_args", "check_layout_call", "HandleOwner", "check_handle_owner",
    "Routing", "DispatchCall", "check_dispatch_call",
    "check_normal_dispatch", "check_cached_dispatch", "check_normal_combine", "check_normal_capacity",
    "check_ll_capacity", "check_buffer_topology", "check_config", "normal_recv_capacity",
    "nvl_buffer_size_hint", "rdma_buffer_size_hint", "ll_rdma_size_hint",
]

#: bf16 dtype (``ml_dtypes.bfloat16``; CuPy 14 uses the same dtype object).
BF16_DTYPE = np.dtype(ml_dtypes.bfloat16)
#: FP8 e4m3fn dtype of the NumPy side (CuPy carries the same bit patterns as ``uint8``).
FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
#: Channels per FP8 scale.
FP8_BLOCK = limits.FP8_BLOCK

_INDEX_DTYPES = (np.dtype(np.int64), np.dtype(np.int32))
_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)
_I64 = np.dtype(np.int64)


# --------------------------------------------------------------------------- helpers
def _dtype_name(dtype):
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _same_dtype(dtype, ref):
    if type(dtype) is type(ref) and isinstance(ref, np.dtype):   # the usual case, without a conversion
        return dtype == ref
    try:
        return np.dtype(dtype) == ref
    except TypeError:
        return False


# Types whose class defines shape, dtype and ndim (every instance has them): checked once per
# type, so that the per-call checks of NumPy and CuPy arrays cost one set lookup.
_ARRAY_TYPES = set()


def is_array(obj):
    """True for an array-like object with ``shape``, ``dtype`` and ``ndim`` (NumPy, CuPy)."""
    cls = type(obj)
    if cls in _ARRAY_TYPES:
        return True
    if isinstance(obj, (tuple, list)) or not all(hasattr(obj, a) for a in ("shape", "dtype", "ndim")):
        return False
    if all(hasattr(cls, a) for a in ("shape", "dtype", "ndim")):
        _ARRAY_TYPES.add(cls)
    return True


def is_bf16_dtype(dtype):
    """True when ``dtype`` is ``ml_dtypes.bfloat16``."""
    return _same_dtype(dtype, BF16_DTYPE)


def is_fp8_dtype(dtype):
    """True when ``dtype`` can carry FP8 e4m3fn data: ``ml_dtypes.float8_e4m3fn`` or ``uint8``.

    The GPU side carries e4m3fn bit patterns as ``uint8`` (CuPy has no float8 dtype).
    """
    return _same_dtype(dtype, FP8_DTYPE) or _same_dtype(dtype, np.dtype(np.uint8))


def check_int(value, name, min_value=None, max_value=None):
    """Check that ``value`` is an integer (not bool) within the given bounds; return it as int."""
    if type(value) is not int:   # the usual case skips the ABC checks (bool is not int here)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        value = int(value)
    if min_value is not None and value < min_value:
        raise ValueError(f"{name}: must be >= {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name}: must be <= {max_value}, got {value}")
    return value


def check_array(arr, name, dtypes=None, ndim=None, shape=None, contiguous=True):
    """Generic array check.

    Args:
        arr: the array (NumPy or CuPy).
        name: argument name used in messages.
        dtypes: a dtype or a tuple of accepted dtypes (None: any).
        ndim: required number of dimensions (None: any).
        shape: required shape; ``None`` entries are free.
        contiguous: require C-contiguity.
    Returns:
        ``arr.shape`` as a tuple of ints.
    """
    if not is_array(arr):
        raise TypeError(f"{name}: expected an array, got {type(arr).__name__}")
    if dtypes is not None:
        if not isinstance(dtypes, tuple):
            dtypes = (dtypes,)
        dtype = arr.dtype
        for d in dtypes:
            if _same_dtype(dtype, d if isinstance(d, np.dtype) else np.dtype(d)):
                break
        else:
            want = " or ".join(_dtype_name(d) for d in dtypes)
            raise TypeError(f"{name}: expected {want}, got {_dtype_name(arr.dtype)}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(arr.shape)}")
    got = arr.shape
    if type(got) is not tuple or not all(type(s) is int for s in got):
        got = tuple(int(s) for s in got)
    if shape is not None:
        ok = len(got) == len(shape) and all(w is None or int(w) == g for w, g in zip(shape, got))
        if not ok:
            want = "[" + ", ".join("*" if w is None else str(int(w)) for w in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(got)}")
    if contiguous:
        flags = getattr(arr, "flags", None)
        if flags is None or not flags.c_contiguous:
            raise ValueError(f"{name}: must be C-contiguous")
    return got


def _min_max(arr):
    if int(np.prod(arr.shape)) == 0:
        return None
    return int(arr.min()), int(arr.max())


# --------------------------------------------------------------------------- routing
def check_num_experts(num_experts, num_ranks):
    """Check ``num_experts`` (positive, a multiple of ``num_ranks``); return ``E_local``."""
    num_ranks = check_int(num_ranks, "num_ranks", 1)
    num_experts = check_int(num_experts, "num_experts", 1)
    if num_experts % num_ranks != 0:
        raise ValueError(
            f"num_experts: must be a multiple of the number of ranks ({num_ranks}), got {num_experts}")
    return num_experts // num_ranks


def check_topk_idx(topk_idx, num_tokens=None, name="topk_idx"):
    """Check ``topk_idx``: 2-D, int64 or int32, C-contiguous, ``num_tokens`` rows if given.

    Returns:
        ``(num_tokens, num_topk)``.
    """
    n, k = check_array(topk_idx, name, dtypes=_INDEX_DTYPES, ndim=2)
    if num_tokens is not None and n != int(num_tokens):
        raise ValueError(f"{name}: expected {int(num_tokens)} rows (one per token), got {n}")
    if k < 1:
        raise ValueError(f"{name}: needs at least one top-k column, got shape {[n, k]}")
    return n, k


def check_topk_range(topk_idx, num_experts, name="topk_idx"):
    """Check that every value of ``topk_idx`` lies in ``[-1, num_experts)`` (synchronises CuPy).

    The message names the first bad id and its token, as the GPU's device report does."""
    mm = _min_max(topk_idx)
    if mm is None:
        return
    lo, hi = mm
    if lo < -1 or hi >= num_experts:
        value = lo if lo < -1 else hi
        where = ""
        try:   # the first bad slot, with the array's own operations (NumPy or CuPy)
            flat = int(((topk_idx < -1) | (topk_idx >= num_experts)).reshape(-1).argmax())
            value = int(topk_idx.reshape(-1)[flat])
            where = f" of token {flat // (int(topk_idx.shape[1]) if topk_idx.ndim == 2 else 1)}"
        except (AttributeError, TypeError):
            pass
        raise ValueError(
            f"{name}: expert id {value}{where} is outside [-1, {num_experts}) (-1 = no expert)")


def check_topk_weights(topk_weights, topk_idx, name="topk_weights"):
    """Check ``topk_weights``: float32, the same shape as ``topk_idx``, C-contiguous."""
    check_array(topk_weights, name, dtypes=_F32, shape=tuple(topk_idx.shape))


# --------------------------------------------------------------------------- data
def check_x(x, name="x", require_fp8_hidden=False, allow_fp8=True, num_tokens=None):
    """Check a token array: bf16 ``[N, H]`` or an FP8 pair ``(x_fp8 [N, H], scales [N, H/128])``.

    Args:
        x: bf16 array (``ml_dtypes.bfloat16``) or a tuple ``(x_fp8, scales)`` with ``x_fp8``
            ``float8_e4m3fn`` or ``uint8`` and ``scales`` float32.
        name: argument name for messages.
        require_fp8_hidden: also require ``H % 128 == 0`` for bf16 input.
        allow_fp8: accept the FP8 pair (False: bf16 only).
        num_tokens: required number of rows, if given.
    Returns:
        ``(is_fp8, num_tokens, hidden)``.

    Hidden constraints: ``H > 0``; ``H % 8 == 0`` for bf16 (16-byte rows); ``H % 128 == 0``
    for FP8.
    """
    if isinstance(x, (tuple, list)):
        if not allow_fp8:
            raise TypeError(f"{name}: expected a bf16 array, got a {type(x).__name__} (FP8 pairs are not accepted here)")
        if len(x) != 2:
            raise TypeError(f"{name}: an FP8 input is a pair (x_fp8, scales), got {len(x)} items")
        data, scales = x
        if not is_array(data):
            raise TypeError(f"{name}[0]: expected an array, got {type(data).__name__}")
        if not is_fp8_dtype(data.dtype):
            raise TypeError(f"{name}[0]: expected float8_e4m3fn or uint8 (FP8 data), got {_dtype_name(data.dtype)}")
        n, h = check_array(data, f"{name}[0]", ndim=2)
        if h <= 0:
            raise ValueError(f"{name}: hidden size must be positive, got {h}")
        if h % FP8_BLOCK != 0:
            raise ValueError(f"{name}: hidden size must be a multiple of {FP8_BLOCK} for FP8, got {h}")
        check_array(scales, f"{name}[1]", dtypes=_F32, shape=(n, h // FP8_BLOCK))
        is_fp8 = True
    else:
        if not is_array(x):
            raise TypeError(f"{name}: expected a bf16 array or an FP8 pair, got {type(x).__name__}")
        if not is_bf16_dtype(x.dtype):
            what = "bf16 (ml_dtypes.bfloat16)" + (" or an FP8 pair (x_fp8, scales)" if allow_fp8 else "")
            raise TypeError(f"{name}: expected {what}, got {_dtype_name(x.dtype)}")
        n, h = check_array(x, name, ndim=2)
        if h <= 0:
            raise ValueError(f"{name}: hidden size must be positive, got {h}")
        if h % 8 != 0:
            raise ValueError(f"{name}: hidden size must be a multiple of 8 (16-byte bf16 rows), got {h}")
        if require_fp8_hidden and h % FP8_BLOCK != 0:
            raise ValueError(f"{name}: hidden size must be a multiple of {FP8_BLOCK}, got {h}")
        is_fp8 = False
    if num_tokens is not None and n != int(num_tokens):
        raise ValueError(f"{name}: expected {int(num_tokens)} rows, got {n}")
    return is_fp8, n, h


def check_bias(bias, num_tokens, hidden, name="bias"):
    """Check ``bias``: None, one bf16 ``[N, H]`` array, or a pair of them (entries may be None).

    Returns:
        a tuple of the arrays present (0, 1 or 2 items).
    """
    if isinstance(bias, (tuple, list)) and len(bias) > 2:
        raise ValueError(f"{name}: at most two bias arrays, got {len(bias)}")
    items = _bias_items(bias, name)
    for nm, b in items:
        check_array(b, nm, dtypes=BF16_DTYPE, shape=(num_tokens, hidden))
    return tuple(b for _, b in items)


def _bias_items(bias, name="bias"):
    """The bias arrays present, each with its name for messages: ``[(name, array)]``."""
    if bias is None:
        return []
    if isinstance(bias, (tuple, list)):
        return [(f"{name}[{i}]", b) for i, b in enumerate(bias) if b is not None]
    return [(name, bias)]


def check_expert_alignment(expert_alignment):
    """Check ``expert_alignment`` (an int >= 1); return it."""
    return check_int(expert_alignment, "expert_alignment", 1)


def check_num_worst_tokens(num_worst_tokens):
    """Check ``num_worst_tokens`` (an int >= 0; 0 = off); return it."""
    return check_int(num_worst_tokens, "num_worst_tokens", 0)


def check_layout_args(num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, num_tokens,
                      num_ranks, num_tokens_per_rdma_rank=None, num_rdma_ranks=None,
                      check_values=True):
    """Check the layout arrays given to ``dispatch`` (as returned by ``get_dispatch_layout``).

    Args:
        num_tokens_per_rank: int32 ``[R]``.
        is_token_in_rank: bool ``[N, R]``.
        num_tokens_per_expert: int32 ``[E]`` with ``E % R == 0``.
        num_tokens: N of this rank.
        num_ranks: R.
        num_tokens_per_rdma_rank: None or int32 ``[num_rdma_ranks]``.
        num_rdma_ranks: expected length of ``num_tokens_per_rdma_rank`` (None: not checked).
        check_values: also check ``num_tokens_per_rank == is_token_in_rank.sum(0)``
            (synchronises CuPy).
    Returns:
        ``num_experts``.
    """
    if num_tokens_per_rank is None:
        raise ValueError("num_tokens_per_rank: required when no handle is given")
    if is_token_in_rank is None:
        raise ValueError("is_token_in_rank: required when no handle is given")
    if num_tokens_per_expert is None:
        raise ValueError("num_tokens_per_expert: required when no handle is given")
    check_array(num_tokens_per_rank, "num_tokens_per_rank", dtypes=_I32, shape=(num_ranks,))
    check_array(is_token_in_rank, "is_token_in_rank", dtypes=np.dtype(np.bool_), shape=(num_tokens, num_ranks))
    (num_experts,) = check_array(num_tokens_per_expert, "num_tokens_per_expert", dtypes=_I32, ndim=1)
    if num_experts == 0 or num_experts % num_ranks != 0:
        raise ValueError(
            f"num_tokens_per_expert: length (num_experts) must be a positive multiple of the number "
            f"of ranks ({num_ranks}), got {num_experts}")
    if num_tokens_per_rdma_rank is not None:
        shape = (num_rdma_ranks,) if num_rdma_ranks is not None else None
        check_array(num_tokens_per_rdma_rank, "num_tokens_per_rdma_rank", dtypes=_I32, ndim=1, shape=shape)
    if check_values:
        mm = _min_max(num_tokens_per_expert)
        if mm is not None and mm[0] < 0:
            raise ValueError(f"num_tokens_per_expert: counts must be >= 0, found {mm[0]}")
        counted = is_token_in_rank.sum(axis=0)
        if bool((counted != num_tokens_per_rank).any()):
            raise ValueError("num_tokens_per_rank: does not match is_token_in_rank.sum(0)")
    return num_experts


def check_cumulative_stats(stats, num_local_experts, name="cumulative_local_expert_recv_stats"):
    """Check the low-latency receive statistics: None or int32 ``[E_local]``, C-contiguous."""
    if stats is None:
        return
    check_array(stats, name, dtypes=_I32, shape=(num_local_experts,))


def check_wait_stats(stats, num_ranks, name):
    """Check receive-wait statistics (``dispatch_wait_recv_cost_stats`` /
    ``combine_wait_recv_cost_stats``): None or int64 ``[num_ranks]`` (DeepEP's shape: one
    accumulated wait per source rank), C-contiguous."""
    if stats is None:
        return
    check_array(stats, name, dtypes=np.int64, shape=(num_ranks,))


def check_out(out, shape, name="out"):
    """Check an output array: None or bf16 of ``shape``, C-contiguous."""
    if out is None:
        return
    check_array(out, name, dtypes=BF16_DTYPE, shape=tuple(shape))


# --------------------------------------------------------------------------- low latency
def check_num_max_dispatch_tokens_per_rank(num_max_dispatch_tokens_per_rank):
    """Check M (an int >= 1); return it."""
    return check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)


def check_ll_dispatch_args(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, num_ranks,
                           check_values=True):
    """Check the arguments of ``low_latency_dispatch``.

    ``x`` bf16 ``[N, H]`` with ``H % 128 == 0``; ``N <= M``; ``topk_idx`` int64/int32
    ``[N, K]`` with values in ``[-1, E)`` (value check skipped when ``check_values=False``);
    ``E % R == 0``; the low-latency kernels' limits (``cupy_ep.limits``): ``K <= LL_MAX_TOPK``,
    ``M <= LL_MAX_TOKENS``, ``E <= LL_MAX_EXPERTS``, ``E_local * R * M < 2**31``.

    Returns:
        ``(num_tokens, hidden, num_topk, num_local_experts)``.
    """
    m = check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
    if m > limits.LL_MAX_TOKENS:
        raise ValueError(f"num_max_dispatch_tokens_per_rank: must be in 1..{limits.LL_MAX_TOKENS}, got {m}")
    e_local = check_num_experts(num_experts, num_ranks)
    if num_experts > limits.LL_MAX_EXPERTS:
        raise ValueError(f"num_experts: the low-latency kernels serve at most {limits.LL_MAX_EXPERTS} experts, "
                         f"got {num_experts}")
    if e_local * int(num_ranks) * m >= 2 ** 31:
        raise ValueError("num_experts * num_max_dispatch_tokens_per_rank: the masked layout exceeds 2**31 rows")
    _, n, h = check_x(x, "x", require_fp8_hidden=True, allow_fp8=False)
    if n > m:
        raise ValueError(
            f"x: {n} tokens exceed num_max_dispatch_tokens_per_rank ({m})")
    _, k = check_topk_idx(topk_idx, n)
    if k > limits.LL_MAX_TOPK:
        raise ValueError(f"topk_idx: the low-latency kernels serve 1..{limits.LL_MAX_TOPK} experts per token, "
                         f"got {k}")
    _check_ll_kernel_fit(int(num_ranks), int(num_experts), m, h, k)
    if check_values:
        check_topk_range(topk_idx, num_experts)
    return n, h, k, e_local


def _check_ll_kernel_fit(num_ranks, num_experts, m, hidden, num_topk):
    """What the low-latency kernels' static shared memory and int32 offsets can hold (the
    static_asserts of kernels_cu/low_latency.cu, so that the host refuses instead of the compiler):
    the receive phase keeps ``R + 1 + E + E/R`` ints, the send phase 12 bytes per rank; work
    units ``R * M * max(K, combine units per row)`` are numbered in int32 (a unit is 512 channels
    with 512 threads per block, 256 with more)."""
    smem = max(4 * (num_ranks + 1 + num_experts + num_experts // num_ranks), 12 * num_ranks + 16 * 32 + 16)
    if smem > limits.LL_MAX_SMEM_BYTES:
        raise ValueError(f"num_experts: {num_experts} experts over {num_ranks} ranks do not fit the low-latency "
                         f"kernels' shared memory ({smem} bytes of {limits.LL_MAX_SMEM_BYTES})")
    unit = 256 if limits.LL_THREADS > 512 else 512
    if num_ranks * m * max(num_topk, -(-hidden // unit)) >= 2 ** 31:
        raise ValueError(f"num_max_dispatch_tokens_per_rank: num_ranks * M * max(top-k, hidden / {unit}) must "
                         f"stay below 2**31 for the low-latency kernels")


class HandleOwner:
    """The Buffer that handles belong to (one per Buffer, on both backends). :meth:`stamp` marks
    each handle its dispatch makes with ``(owner, dispatch number)``; :func:`check_handle_owner`
    refuses the handles of other Buffers, whose slots and shapes may look the same."""

    def __init__(self):
        self.dispatches = 0

    def stamp(self, record) -> None:
        """Marks ``record`` (a normal-mode handle, or ``handle[5]`` of a low-latency one) as made
        by the next dispatch of this Buffer."""
        self.dispatches += 1
        record.owner = (self, self.dispatches)


def check_handle_owner(handle, owner: HandleOwner, name="handle"):
    """ValueError unless ``handle`` (normal-mode, or a low-latency tuple whose ``handle[5]`` is
    stamped) was made by a dispatch of the Buffer that ``owner`` belongs to."""
    record = handle
    if isinstance(handle, (tuple, list)):
        if len(handle) < 6:
            raise TypeError(f"{name}: expected the 6 items of a handle returned by low_latency_dispatch, got "
                            f"{len(handle)}")
        record = handle[5]
    made = getattr(record, "owner", None)
    if not (isinstance(made, tuple) and made and made[0] is owner):
        raise ValueError(f"{name}: not made by a dispatch of this Buffer (another Buffer's handle, even of the "
                         "same shapes, would let the kernels use its slots); pass each Buffer its own handles")


def check_ll_handle(handle, num_ranks, name="handle"):
    """Check a low-latency handle ``(src_info, layout_range, M, hidden, num_experts, ...)``.

    Returns:
        ``(src_info, layout_range, M, hidden, num_experts)``.
    """
    if not isinstance(handle, (tuple, list)) or len(handle) < 5:
        raise TypeError(f"{name}: expected the handle returned by low_latency_dispatch")
    src_info, layout_range, m, h, e = handle[:5]
    m = check_int(m, f"{name}[2] (num_max_dispatch_tokens_per_rank)", 1)
    h = check_int(h, f"{name}[3] (hidden)", 1)
    e_local = check_num_experts(e, num_ranks)
    check_array(src_info, f"{name}[0] (src_info)", dtypes=_I32, shape=(e_local, num_ranks * m))
    check_array(layout_range, f"{name}[1] (layout_range)", dtypes=_I64, shape=(e_local, num_ranks))
    return src_info, layout_range, m, h, int(e)


def check_ll_combine_args(x, topk_idx, topk_weights, handle, num_ranks, out=None, check_values=True):
    """Check the arguments of ``low_latency_combine``.

    ``x`` bf16 ``[E_local, R*M, H]`` with ``H`` the dispatch's hidden size; ``topk_idx`` and
    ``topk_weights`` (float32) ``[N, K]`` with the dispatch's N and K (``handle[5].num_tokens``,
    ``handle[5].topk``) and values in ``[-1, E)``; ``out`` None or bf16 ``[N, H]``.

    Returns:
        ``(num_tokens, hidden, num_topk)``.
    """
    _, _, m, h, e = check_ll_handle(handle, num_ranks)
    private = handle[5] if len(handle) > 5 else None
    if not (hasattr(private, "num_tokens") and hasattr(private, "topk")):
        raise TypeError("handle: expected the handle returned by low_latency_dispatch (its 6 items; "
                        "handle[5] carries the dispatch's number of tokens and top-k width)")
    want_n, want_k = int(private.num_tokens), int(private.topk)
    e_local = e // num_ranks
    if not is_array(x):
        raise TypeError(f"x: expected a bf16 array, got {type(x).__name__}")
    if not is_bf16_dtype(x.dtype):
        raise TypeError(f"x: expected bf16 (ml_dtypes.bfloat16), got {_dtype_name(x.dtype)}")
    check_array(x, "x", shape=(e_local, num_ranks * m, h))
    n, k = check_topk_idx(topk_idx)
    if (n, k) != (want_n, want_k):
        raise ValueError(f"topk_idx: expected shape [{want_n}, {want_k}] (the num_tokens and top-k of the dispatch "
                         f"that made handle), got {[n, k]}")
    if check_values:
        check_topk_range(topk_idx, e)
    if topk_weights is None:
        raise ValueError("topk_weights: required by low_latency_combine")
    check_topk_weights(topk_weights, topk_idx)
    check_out(out, (n, h))
    return n, h, k


# --------------------------------------------------------------------------- Buffer and normal mode
LL_TRANSPORTS = ("auto", "nvlink", "rdma")


def check_buffer_args(num_nvl_bytes, num_rdma_bytes, low_latency_mode, timeout_s=limits.DEFAULT_TIMEOUT_S,
                      ll_transport="auto", num_sms=None):
    """Check a Buffer's arguments before anything is made: sizes are ints >= 0 and
    ``low_latency_mode`` needs ``num_rdma_bytes > 0``; ``timeout_s`` a positive number;
    ``ll_transport`` one of :data:`LL_TRANSPORTS` (with ``low_latency_mode``); ``num_sms`` None
    or an int in ``[limits.MIN_NUM_SMS, limits.MAX_NUM_SMS]`` (:func:`check_num_sms`)."""
    check_int(num_nvl_bytes, "num_nvl_bytes", 0)
    check_int(num_rdma_bytes, "num_rdma_bytes", 0)
    if low_latency_mode and num_rdma_bytes == 0:
        raise ValueError("num_rdma_bytes: low_latency_mode needs an NVSHMEM buffer (num_rdma_bytes > 0)")
    try:
        timeout_ok = bool(0 < timeout_s < math.inf)
    except TypeError:
        timeout_ok = False
    if not timeout_ok:
        raise ValueError(f"timeout_s: expected a positive, finite number of seconds, got {timeout_s!r}")
    if low_latency_mode and ll_transport not in LL_TRANSPORTS:
        raise ValueError(f"ll_transport: expected one of {', '.join(map(repr, LL_TRANSPORTS))}, got {ll_transport!r}")
    if num_sms is not None:
        check_num_sms(num_sms)


def check_enable_shrink(enable_shrink, low_latency_mode):
    """Check ``enable_shrink``: a bool, True only with ``low_latency_mode``."""
    if not isinstance(enable_shrink, (bool, np.bool_)):
        raise TypeError(f"enable_shrink: expected a bool, got {type(enable_shrink).__name__}")
    if enable_shrink and not low_latency_mode:
        raise ValueError("enable_shrink: shrink mode masks ranks of the low-latency calls; it needs "
                         "low_latency_mode=True")


def check_shrink_call(enable_shrink):
    """The mask calls (``low_latency_*_mask_buffer``) need a Buffer made with ``enable_shrink``."""
    if not enable_shrink:
        raise ValueError("enable_shrink: the mask calls need a Buffer made with enable_shrink=True")


def check_mask_update(rank_to_mask, mask, rank, num_ranks):
    """``low_latency_update_mask_buffer``'s arguments: a rank in ``[0, num_ranks)``, not this
    ``rank`` when masking (a rank cannot mask itself). Returns ``(rank_to_mask, 0 or 1)``."""
    r = check_int(rank_to_mask, "rank_to_mask", 0, num_ranks - 1)
    if r == rank and mask:
        raise ValueError(f"rank_to_mask: a rank cannot mask itself (rank {r})")
    return r, int(bool(mask))


def check_num_sms(num_sms, name="num_sms"):
    """An SM count of the normal-mode kernels: an int in ``[limits.MIN_NUM_SMS,
    limits.MAX_NUM_SMS]`` (the one check of :class:`cupy_ep.Config`, the Buffers' constructors and
    ``set_num_sms``); returned as int."""
    return check_int(num_sms, name, limits.MIN_NUM_SMS, limits.MAX_NUM_SMS)


def check_same_on_every_rank(comm, **values):
    """Raises ValueError on every rank (collective over ``comm``) when one of ``values`` differs
    between ranks, naming it: a Buffer's ranks must agree on its arguments."""
    gathered = comm.allgather(tuple(values.values()))
    for i, name in enumerate(values):
        by_rank = [g[i] for g in gathered]
        if any(v != by_rank[0] for v in by_rank):
            raise ValueError(f"{name}: must be the same on every rank, got {by_rank} (by rank)")


def check_internode_args(num_rdma_ranks, num_rdma_bytes):
    """Normal mode across ``num_rdma_ranks`` NVLink domains: a symmetric buffer is needed, and at
    most ``MAX_RDMA_RANKS`` domains are served."""
    if num_rdma_ranks > limits.MAX_RDMA_RANKS:
        raise ValueError(f"num_nvl_peers: the normal mode serves at most {limits.MAX_RDMA_RANKS} NVLink domains, "
                         f"got {num_rdma_ranks}")
    if num_rdma_bytes == 0:
        raise ValueError(f"num_rdma_bytes: the ranks span {num_rdma_ranks} NVLink domains; the normal mode needs an "
                         "NVSHMEM buffer between them (Buffer.get_rdma_buffer_size_hint)")


def check_layout_call(topk_idx, num_experts, num_ranks):
    """Check the arguments of ``get_dispatch_layout``; returns ``(num_tokens, num_topk)``.
    Remembered once passed (:func:`_passed`)."""
    def check():
        check_num_experts(num_experts, num_ranks)
        if num_experts > limits.MAX_EXPERTS:
            raise ValueError(f"num_experts: the normal mode serves at most {limits.MAX_EXPERTS} experts, "
                             f"got {num_experts}")
        n, k = check_topk_idx(topk_idx)
        if k > limits.MAX_NORMAL_TOPK:
            raise ValueError(f"topk_idx: the normal mode serves at most {limits.MAX_NORMAL_TOPK} top-k columns, "
                             f"got {k}")
        return n, k

    return _passed(_PASSED_LAYOUT, _facts_key(topk_idx, num_experts, num_ranks), check)


def check_normal_dispatch(num_tokens, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                          num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                          num_ranks, num_rdma_ranks):
    """Shapes and types of a non-cached ``dispatch`` (values are checked by the backends: the GPU
    on the device, the reference on the host). Returns ``num_experts``."""
    if num_tokens_per_rdma_rank is not None and num_rdma_ranks == 1:
        raise ValueError("num_tokens_per_rdma_rank: must be None inside one NVLink domain")
    num_experts = check_layout_args(num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, num_tokens,
                                    num_ranks, num_tokens_per_rdma_rank, num_rdma_ranks, check_values=False)
    if num_experts > limits.MAX_EXPERTS:
        raise ValueError(f"num_tokens_per_expert: the normal mode serves at most {limits.MAX_EXPERTS} experts, "
                         f"got {num_experts}")
    if topk_idx is not None:
        _, k = check_topk_idx(topk_idx, num_tokens)
        if k > limits.MAX_NORMAL_TOPK:
            raise ValueError(f"topk_idx: the normal mode serves at most {limits.MAX_NORMAL_TOPK} top-k columns, "
                             f"got {k}")
        if topk_weights is None:
            raise ValueError("topk_weights: required with topk_idx")
        check_topk_weights(topk_weights, topk_idx)
    elif topk_weights is not None:
        raise ValueError("topk_weights: given without topk_idx")
    check_expert_alignment(expert_alignment)
    check_num_worst_tokens(num_worst_tokens)
    return num_experts


def check_cached_dispatch(handle, num_tokens, hidden, topk_idx, topk_weights, num_worst_tokens=0):
    """A cached ``dispatch`` (``handle`` given): the same ``[N, H]`` as the handle's dispatch, no
    new routing, and the handle's number of rows."""
    if topk_idx is not None:
        raise ValueError("topk_idx: must be None in a cached dispatch (handle given)")
    if topk_weights is not None:
        raise ValueError("topk_weights: must be None in a cached dispatch (handle given)")
    if num_tokens != handle.num_tokens or hidden != handle.hidden:
        raise ValueError(f"x: the cached handle was made for [{handle.num_tokens}, {handle.hidden}], "
                         f"got [{num_tokens}, {hidden}]")
    check_num_worst_tokens(num_worst_tokens)
    if num_worst_tokens not in (0, handle.num_rows):
        raise ValueError(f"num_worst_tokens: a cached dispatch has the rows of its handle ({handle.num_rows}), "
                         f"got {num_worst_tokens}")


def check_normal_combine(x, handle, topk_weights, bias):
    """``combine``: ``x`` bf16 ``[handle rows, H]``; optional float32 weights ``[handle rows, K]``
    with the dispatch's K (a dispatch without ``topk_idx`` takes none); biases bf16 ``[N, H]``.
    Returns the bias arrays present (a tuple). Remembered once passed (:func:`_passed`)."""
    def check():
        check_x(x, "x", allow_fp8=False, num_tokens=handle.num_rows)
        if x.shape[1] != handle.hidden:
            raise ValueError(f"x: expected hidden size {handle.hidden} (the dispatch's), got {x.shape[1]}")
        if topk_weights is not None:
            if handle.num_topk == 0:
                raise ValueError("topk_weights: the dispatch that made handle had no topk_idx")
            check_array(topk_weights, "topk_weights", dtypes=_F32, shape=(handle.num_rows, handle.num_topk))
        check_bias(bias, handle.num_tokens, handle.hidden)

    key = _facts_key(x, topk_weights, bias)
    if key is not None:   # the handle's sizes: the ints its dispatch recorded
        key = (key, handle.num_rows, handle.hidden, handle.num_topk, handle.num_tokens)
    _passed(_PASSED_COMBINE, key, check)
    return () if bias is None else tuple(b for _, b in _bias_items(bias))


@dataclass(frozen=True)
class Routing:
    """The routing of a new (not cached) normal-mode dispatch, as the engines take it."""

    num_tokens_per_rank: object
    is_token_in_rank: object
    num_tokens_per_expert: object
    num_experts: int
    num_topk: int                             # columns of topk_idx, 0 without it
    num_tokens_per_rdma_rank: object = None   # None inside one NVLink domain


@dataclass(frozen=True)
class DispatchCall:
    """What :func:`check_dispatch_call` found: the data's kind and shape, the top-k width (the
    handle's in a cached dispatch) and, for a new dispatch, its routing (None when cached)."""

    is_fp8: bool
    num_tokens: int
    hidden: int
    num_topk: int
    routing: Optional[Routing]


def check_dispatch_call(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                        num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens, *,
                        num_ranks, num_nvl_ranks, num_nvl_bytes, num_rdma_bytes) -> DispatchCall:
    """The arguments of a normal-mode ``dispatch``, the same on both backends (the handle's type
    and owner, and the config, are the caller's): ``x``, then a cached dispatch's
    (:func:`check_cached_dispatch`) or a new one's (:func:`check_normal_dispatch`), then whether
    the buffers hold the tokens (:func:`check_normal_capacity`). Remembered once passed
    (:func:`_passed`)."""
    key = _facts_key(x, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank, num_tokens_per_expert,
                     topk_idx, topk_weights, expert_alignment, num_worst_tokens, num_ranks, num_nvl_ranks,
                     num_nvl_bytes, num_rdma_bytes)
    if key is not None:   # a handle's sizes: the ints its dispatch recorded
        key = (key, None if handle is None else (handle.num_tokens, handle.hidden, handle.num_rows, handle.num_topk))

    def check():
        """A cached dispatch's whole result (it holds no array of the call), or a new one's sizes."""
        is_fp8, num_tokens, hidden = check_x(x)
        if handle is not None:
            check_cached_dispatch(handle, num_tokens, hidden, topk_idx, topk_weights, num_worst_tokens)
            check_normal_capacity(num_tokens, hidden, handle.num_topk, num_nvl_bytes, num_ranks, num_nvl_ranks,
                                  num_rdma_bytes)
            return DispatchCall(is_fp8, num_tokens, hidden, handle.num_topk, None)
        num_experts = check_normal_dispatch(num_tokens, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                            is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                                            expert_alignment, num_worst_tokens, num_ranks, num_ranks // num_nvl_ranks)
        num_topk = 0 if topk_idx is None else int(topk_idx.shape[1])
        check_normal_capacity(num_tokens, hidden, num_topk, num_nvl_bytes, num_ranks, num_nvl_ranks, num_rdma_bytes)
        return is_fp8, num_tokens, hidden, num_topk, num_experts

    passed = _passed(_PASSED_DISPATCH, key, check)
    if handle is not None:
        return passed
    is_fp8, num_tokens, hidden, num_topk, num_experts = passed
    return DispatchCall(is_fp8, num_tokens, hidden, num_topk, Routing(num_tokens_per_rank, is_token_in_rank,
                                                                      num_tokens_per_expert, num_experts, num_topk,
                                                                      num_tokens_per_rdma_rank))


# Results of argument checks that passed, by the facts they read (_facts_key): a call whose
# arguments have the same facts as an earlier one that passed would pass again, so its checks are
# not run again (they cost ~1-3 µs of host time per array). Each table is emptied when full.
_PASSED_DISPATCH: dict = {}
_PASSED_COMBINE: dict = {}
_PASSED_LAYOUT: dict = {}
_PASSED_MAX = 256
_UNCHECKED = object()   # no result remembered under a key (results may be anything, None included)


def _passed(table: dict, key, check):
    """``check()``'s result, remembered in ``table`` under ``key`` once it returned (raised:
    nothing remembered, the next call checks again); ``key`` None: checked every time."""
    if key is None:
        return check()
    result = table.get(key, _UNCHECKED)
    if result is _UNCHECKED:
        result = check()
        if len(table) >= _PASSED_MAX:
            table.clear()
        table[key] = result
    return result


_SCALAR_TYPES = (int, bool, float, str, type(None))


def _facts(value):
    """What the argument checks read of one argument, hashable: an array's type, shape, dtype
    and C-contiguity; a tuple's or list's items; a plain scalar's type and value. None for an
    argument of another kind (its checks then run every call)."""
    cls = type(value)
    if cls in _ARRAY_TYPES:
        shape = value.shape
        if type(shape) is not tuple:
            return None
        contiguous = getattr(value, "_c_contiguous", None)   # CuPy's flag, without a flags object
        if contiguous is None:
            flags = getattr(value, "flags", None)
            contiguous = None if flags is None else bool(flags.c_contiguous)
        return cls, shape, value.dtype, contiguous
    if cls in _SCALAR_TYPES or isinstance(value, np.integer):
        return cls, value
    if cls is tuple or cls is list:
        items = [_facts(v) for v in value]
        return None if None in items else (cls, *items)
    return None


def _facts_key(*values):
    """The facts of every argument (:func:`_facts`; an absent one, None, as None) as one key,
    None if one has none."""
    key = []
    append = key.append
    for v in values:
        if v is None:
            append(None)
            continue
        f = _facts(v)
        if f is None:
            return None
        append(f)
    return tuple(key)


def check_normal_capacity(num_tokens, hidden, num_topk, num_nvl_bytes, num_ranks, num_nvl_ranks, num_rdma_bytes):
    """The buffers hold ``num_tokens`` tokens of ``hidden`` channels per rank (the GPU's geometry)."""
    capacity = geometry.normal_send_capacity(num_nvl_bytes, num_rdma_bytes, num_ranks, num_nvl_ranks, hidden,
                                             num_topk)
    if num_tokens <= capacity:
        return
    if num_nvl_ranks == num_ranks:
        raise ValueError(f"x: {num_tokens} tokens do not fit the NVLink buffer (room for {capacity} per rank at "
                         f"hidden {hidden}); raise num_nvl_bytes (get_nvl_buffer_size_hint)")
    raise ValueError(f"x: {num_tokens} tokens do not fit the NVSHMEM buffer (room for {capacity} per rank at "
                     f"hidden {hidden}); raise num_rdma_bytes (get_rdma_buffer_size_hint)")


def _check_hint_shape(num_max_tokens_per_rank, hidden, num_ranks, num_topk, num_nvl_peers):
    """The arguments of the normal-mode size hints, as ints; ``num_nvl_peers`` divides ``num_ranks``."""
    n = check_int(num_max_tokens_per_rank, "num_max_tokens_per_rank", 0)
    h = check_int(hidden, "hidden", 1)
    r = check_int(num_ranks, "num_ranks", 1)
    k = check_int(num_topk, "num_topk", 0)
    nvl = r if num_nvl_peers is None else check_int(num_nvl_peers, "num_nvl_peers", 1)
    if nvl < r and r % nvl != 0:
        raise ValueError(f"num_nvl_peers: must divide num_ranks ({r}), got {nvl}")
    return n, h, r, k, min(nvl, r)


def nvl_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_topk, num_nvl_peers=None,
                         num_max_recv_tokens=None):
    """``num_nvl_bytes`` the normal mode needs (``Buffer.get_nvl_buffer_size_hint`` of both
    backends): :func:`cupy_ep.geometry.normal_nvl_size_hint` of checked arguments."""
    n, h, r, k, nvl = _check_hint_shape(num_max_tokens_per_rank, hidden, num_ranks, num_topk, num_nvl_peers)
    rows = None if num_max_recv_tokens is None or nvl == r else \
        check_int(num_max_recv_tokens, "num_max_recv_tokens", 0)
    return int(geometry.normal_nvl_size_hint(n, h, r, k, nvl, rows))


def rdma_buffer_size_hint(num_max_tokens_per_rank, hidden, num_ranks, num_nvl_peers, num_topk):
    """``num_rdma_bytes`` the normal mode needs across NVLink domains, 0 for one domain
    (``Buffer.get_rdma_buffer_size_hint`` of both backends)."""
    if num_nvl_peers is None:
        check_int(num_nvl_peers, "num_nvl_peers", 1)   # required here: raises
    n, h, r, k, nvl = _check_hint_shape(num_max_tokens_per_rank, hidden, num_ranks, num_topk, num_nvl_peers)
    return int(geometry.normal_rdma_size_hint(n, h, r, nvl, k))


def ll_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
    """``num_rdma_bytes`` the low-latency mode needs (``Buffer.get_low_latency_rdma_size_hint`` of
    both backends: any top-k up to ``limits.LL_MAX_TOPK``, bf16 or FP8)."""
    m = check_num_max_dispatch_tokens_per_rank(num_max_dispatch_tokens_per_rank)
    h = check_int(hidden, "hidden", 1)
    check_num_experts(num_experts, num_ranks)
    return int(geometry.ll_size_hint(m, h, int(num_ranks)))


def check_ll_capacity(num_rdma_bytes, num_ranks, num_experts, m, hidden):
    """The low-latency buffer holds ``m`` tokens per rank of ``hidden`` channels for ``num_experts``
    experts (the GPU's geometry, whatever the transport)."""
    need = geometry.ll_size_hint(m, hidden, num_ranks)
    if num_rdma_bytes < need:
        raise ValueError(f"num_rdma_bytes: {num_rdma_bytes} bytes are too small for {m} tokens per rank of hidden "
                         f"{hidden} and {num_experts} experts ({need} needed: get_low_latency_rdma_size_hint)")


def check_buffer_topology(num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_ranks, num_nvl_ranks):
    """What a Buffer's modes need from its topology (after :func:`check_buffer_args`): the normal
    mode serves NVLink domains of at most ``MAX_NVL_PEERS`` ranks and, across several domains
    without ``low_latency_mode``, needs a symmetric buffer (:func:`check_internode_args`); the
    low-latency mode serves at most ``LL_MAX_RANKS`` ranks."""
    num_rdma_ranks = num_ranks // num_nvl_ranks
    if num_nvl_bytes > 0 and num_nvl_ranks > limits.MAX_NVL_PEERS:
        raise ValueError(f"num_nvl_peers: the normal mode serves NVLink domains of at most "
                         f"{limits.MAX_NVL_PEERS} ranks, got {num_nvl_ranks}")
    if num_nvl_bytes > 0 and num_rdma_ranks > 1 and not low_latency_mode:
        check_internode_args(num_rdma_ranks, num_rdma_bytes)
    if low_latency_mode and not 1 <= num_ranks <= limits.LL_MAX_RANKS:
        raise ValueError(f"comm: the low-latency kernels serve 1..{limits.LL_MAX_RANKS} ranks, got {num_ranks}")


@functools.cache
def _config_type():
    from .config import Config   # config.py imports this module

    return Config


def check_config(config, num_nvl_ranks):
    """A normal-mode ``config``: None (the default) or a :class:`cupy_ep.Config` with at least one
    warp per rank of the NVLink domain. Returns it."""
    if config is None:
        return None
    if not isinstance(config, _config_type()):
        raise TypeError(f"config: expected a cupy_ep.Config, got {type(config).__name__}")
    if config.num_threads // 32 < num_nvl_ranks:
        raise ValueError(f"config: num_threads {config.num_threads} gives fewer warps than the "
                         f"{num_nvl_ranks} ranks of a domain (blocks serve each peer with at least one warp)")
    return config


def normal_recv_capacity(num_nvl_bytes, num_ranks, num_nvl_ranks, hidden, num_topk):
    """Rows a rank can receive in one normal-mode dispatch, None when the geometry does not bound
    them (:func:`cupy_ep.geometry.normal_recv_capacity`); more rows make the GPU drop the excess
    and report :class:`cupy_ep.errors.TokenOverflowError`."""
    rows = geometry.normal_recv_capacity(num_nvl_bytes, num_ranks, num_nvl_ranks, hidden, num_topk)
    return None if rows is None else int(rows)
