"""NVSHMEM's transport as the environment chooses it, and the proxy-transport test switch.

NVSHMEM reads its transport from environment variables when it initialises (the first GPU
Buffer that needs it, :func:`cupy_ep.bootstrap.init_nvshmem`). This module names the few that
decide which path cupy_ep's cross-domain puts take (:func:`describe`), and implements
``CUPY_EP_TEST_PROXY_TRANSPORT=1``, a test mode that makes one host exercise NVSHMEM's network
path: P2P off for every pair of PEs (``NVSHMEM_DISABLE_P2P=1``), the UCX transport
(``NVSHMEM_REMOTE_TRANSPORT=ucx``) over TCP on the loopback (``UCX_TLS=tcp,cuda_copy,self``,
``UCX_NET_DEVICES=lo``), so that every put, fence and quiet goes through NVSHMEM's CPU proxy
thread and completes asynchronously, as on a cluster without IBGDA. Variables the user set
keep their values. UCX itself (``libucp.so.0``, PyPI ``libucx-cu13``) must be on the library
path when the process starts.

Pure: imports nothing from the GPU engines; :func:`apply` only edits ``os.environ`` and loads
UCX to see that it is there.
"""
from __future__ import annotations

import ctypes
import os

from .errors import CupyEpError

SWITCH = "CUPY_EP_TEST_PROXY_TRANSPORT"
PROXY_SETTINGS = {
    "NVSHMEM_DISABLE_P2P": "1",
    "NVSHMEM_REMOTE_TRANSPORT": "ucx",
    "UCX_TLS": "tcp,cuda_copy,self",
    "UCX_NET_DEVICES": "lo",
}
UCX_LIBRARY = "libucp.so.0"


def proxy_requested(environ=None) -> bool:
    """Whether ``CUPY_EP_TEST_PROXY_TRANSPORT`` asks for the proxy transport ("1"; unset, "" or
    "0": no). Any other value raises ValueError."""
    value = (os.environ if environ is None else environ).get(SWITCH, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{SWITCH}={value!r}: expected 1 (proxy transport) or 0")
    return value == "1"


def apply(environ=None, load=ctypes.CDLL) -> dict | None:
    """With the switch on: sets each of :data:`PROXY_SETTINGS` that ``environ`` (default
    ``os.environ``) lacks, checks that UCX loads (``load(UCX_LIBRARY)``) and returns the
    settings now in force; None with the switch off (nothing changed). Raises
    :class:`CupyEpError` when UCX cannot be loaded, before NVSHMEM would fail less clearly."""
    environ = os.environ if environ is None else environ
    if not proxy_requested(environ):
        return None
    for name, value in PROXY_SETTINGS.items():
        environ.setdefault(name, value)
    try:
        load(UCX_LIBRARY)
    except OSError as e:
        raise CupyEpError(
            f"{SWITCH}=1 needs UCX for NVSHMEM's UCX transport, but {UCX_LIBRARY} cannot be loaded ({e}); "
            f"install it (pip install libucx-cu13) and put the directory holding {UCX_LIBRARY} on "
            f"LD_LIBRARY_PATH before starting the processes") from e
    return {name: environ[name] for name in PROXY_SETTINGS}


def describe(environ=None) -> str:
    """One phrase naming the NVSHMEM transport that the environment selects, e.g.
    ``"NVSHMEM remote transport ucx, P2P off (proxy test mode)"``: the remote transport
    (NVSHMEM's default is ibrc), IBGDA when enabled, the libfabric provider, and P2P off."""
    env = os.environ if environ is None else environ
    remote = env.get("NVSHMEM_REMOTE_TRANSPORT") or "ibrc (default)"
    parts = [f"NVSHMEM remote transport {remote}"]
    if env.get("NVSHMEM_IB_ENABLE_IBGDA", "0") not in ("", "0"):
        parts.append("IBGDA on")
    if remote == "libfabric":
        parts.append(f"provider {env.get('NVSHMEM_LIBFABRIC_PROVIDER') or 'cxi (default)'}")
    if env.get("NVSHMEM_DISABLE_P2P", "0") not in ("", "0"):
        parts.append("P2P off")
    if env.get(SWITCH) == "1":
        parts.append(f"proxy test mode, UCX_TLS={env.get('UCX_TLS', '')}")
    return ", ".join(parts)
