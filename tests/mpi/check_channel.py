"""A refusal that no peer read, on a channel since freed, must not reach a later channel:

    mpiexec -n 2 python tests/mpi/check_channel.py

MPI gives a new ``Dup`` the context of a freed communicator, and delivers there a message sent on
the old one that nobody received. Each round: the last rank refuses call 1 of a channel's
CallSteps (the others make no step in it, as a GPU call whose kernels are compiled), every rank
frees the channel, opens a new one and makes call 1's compile agreement on it, which must return
every rank's object. Rank 0 prints "OK channel ranks=R rounds=N".
"""
import sys

from mpi4py import MPI

from cupy_ep.collective import CallSteps
from cupy_ep.testing import run_or_abort

ROUNDS = 5
TIMEOUT_S = 10.0


def one_round(comm):
    last = comm.Get_rank() == comm.Get_size() - 1
    old = CallSteps.over(comm, TIMEOUT_S, "Buffer")
    try:
        with old.begin("dispatch"):
            if last:
                raise ValueError("x: bad on the last rank")
    except ValueError:
        pass
    comm.Barrier()          # the refusal has been sent before the channel is freed
    old.free()
    new = CallSteps.over(comm, TIMEOUT_S, "Buffer")
    try:
        new.begin("dispatch")
        got = new.allgather(comm.Get_rank())
    finally:
        new.free()
    if got != list(range(comm.Get_size())):
        raise AssertionError(f"rank {comm.Get_rank()}: the new channel's agreement returned {got}")


def main():
    comm = MPI.COMM_WORLD
    for _ in range(ROUNDS):
        one_round(comm)
    comm.Barrier()
    if comm.Get_rank() == 0:
        print(f"OK channel ranks={comm.Get_size()} rounds={ROUNDS}")
    sys.stdout.flush()


if __name__ == "__main__":
    run_or_abort(main)
