"""An mpi4py-like communicator over a ``torch.distributed`` ProcessGroup.

cupy_ep's bootstrap (:mod:`cupy_ep.bootstrap`), its collective compilation and its Buffers talk
to their ranks through a few communicator methods: ``Get_rank``, ``Get_size``, ``allgather``,
``bcast``, ``Bcast``, ``Barrier``, ``Split`` and ``Free``, plus two that stand in for MPI's
topology calls (``split_host``, ``world_ranks``). :class:`TorchComm` provides them over a
ProcessGroup, so that a job started by ``torchrun`` needs no MPI: CUDA IPC handles and the
NVSHMEM unique id travel over the group's collectives.

The collectives carry small Python objects, so they run over a gloo group of the same ranks (the
given group itself when it is gloo's; with an NCCL group a gloo group is made once, by its ranks
alone). Importing this module does not import torch.
"""
from __future__ import annotations

import socket

__all__ = ["TorchComm"]


def _new_gloo_group(global_ranks):
    """A gloo group of ``global_ranks``, made by those ranks alone (the others need not call)."""
    import torch.distributed as dist

    return dist.new_group(sorted(global_ranks), backend="gloo", use_local_synchronization=True)


class TorchComm:
    """The communicator methods cupy_ep uses, over a ``torch.distributed`` ProcessGroup.

    Args:
        group: a ProcessGroup (``torch.distributed.group.WORLD`` or one from ``new_group``); every
            call is collective over its ranks, as with MPI.

    Ranks keep the group's order (torch orders a group's ranks by global rank).
    ``Free`` is a no-op: torch keeps its groups until ``destroy_process_group``.
    """

    def __init__(self, group, _cpu_group=None):
        import torch.distributed as dist

        self.group = group
        self._global_ranks = tuple(int(r) for r in dist.get_process_group_ranks(group))
        self._rank = int(group.rank())
        self._size = int(group.size())
        if _cpu_group is None:
            _cpu_group = group if str(dist.get_backend(group)) == "gloo" else _new_gloo_group(self._global_ranks)
        self._cpu = _cpu_group

    # -- what mpi4py's communicators offer ---------------------------------------------------
    def Get_rank(self) -> int:
        return self._rank

    def Get_size(self) -> int:
        return self._size

    def allgather(self, obj) -> list:
        import torch.distributed as dist

        out = [None] * self._size
        dist.all_gather_object(out, obj, group=self._cpu)
        return out

    def bcast(self, obj, root: int = 0):
        import torch.distributed as dist

        box = [obj if self._rank == root else None]
        dist.broadcast_object_list(box, src=self._global_ranks[root], group=self._cpu)
        return box[0]

    def Bcast(self, buf, root: int = 0) -> None:
        """Broadcasts a writable NumPy array in place (``buf`` is overwritten on the other ranks)."""
        import numpy as np

        data = self.bcast(buf.tobytes() if self._rank == root else None, root)
        if self._rank != root:
            buf[...] = np.frombuffer(data, dtype=buf.dtype).reshape(buf.shape)

    def Barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self._cpu)

    def Split(self, color: int, key: int = 0) -> "TorchComm":
        """The ranks of this group with the same ``color``, ordered by ``key`` (collective).

        torch orders a group's ranks by global rank, so the ``key`` order must be that order (as
        it is when ``key`` is the rank, the way cupy_ep splits); otherwise NotImplementedError.
        """
        entries = self.allgather((int(color), int(key), self._rank))
        members = sorted((k, r) for c, k, r in entries if c == int(color))
        ranks = [r for _, r in members]
        if ranks != sorted(ranks):
            raise NotImplementedError(f"TorchComm.Split: key order {ranks} is not the group's rank order "
                                      "(torch orders a group by global rank)")
        if len(ranks) == self._size:
            return TorchComm(self.group, self._cpu)
        sub = _new_gloo_group([self._global_ranks[r] for r in ranks])
        return TorchComm(sub, sub)

    def Free(self) -> None:
        """Nothing to free: torch keeps its groups until ``destroy_process_group``."""

    # -- what cupy_ep's bootstrap asks of communicators that are not mpi4py's -----------------
    def split_host(self, key: int) -> "TorchComm":
        """The ranks on this host (by host name), ordered by ``key`` (collective)."""
        hosts = self.allgather(socket.gethostname())
        return self.Split(sorted(set(hosts)).index(hosts[self._rank]), key)

    def world_ranks(self) -> tuple:
        """The global ranks of this group's ranks, in its order (NVSHMEM's PEs are its ranks)."""
        return self._global_ranks
