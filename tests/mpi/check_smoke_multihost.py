"""scripts/smoke_multihost.py on CPUs: the reference backend stands in for the GPU Buffer.

    mpiexec -n 2 python tests/mpi/check_smoke_multihost.py MODE [smoke_multihost.py options]

MODE "good": the stand-in is the reference itself, so the script must print PASS. "corrupt": the
stand-in's combine makes one element NaN on the last rank, so the script must print FAIL naming that
rank. "hang": the last rank's dispatch never returns, so the watchdog must end the job with a FAIL
line. What is checked is the script's flow (sizes, topology, the one result line, exit status);
the comparisons themselves are cupy_ep.testing's.
"""
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))

import bench_common  # noqa: E402
import smoke_multihost  # noqa: E402

import cupy_ep  # noqa: E402
from cupy_ep import reference, testing  # noqa: E402

MODE = sys.argv[1]


class StandIn(reference.Buffer):
    """The reference Buffer as the 'GPU' one, broken on the last rank as MODE asks."""

    def _last(self):
        return self.comm.Get_rank() == self.comm.Get_size() - 1

    def dispatch(self, *args, config=None, **kw):
        if MODE == "hang" and self._last():
            time.sleep(3600)
        return super().dispatch(*args, **kw)

    def combine(self, *args, config=None, **kw):
        x, w, event = super().combine(*args, **kw)
        if MODE == "corrupt" and self._last() and x.size:
            x = x.copy()
            x.reshape(-1)[0] = np.float32("nan")   # NaN never passes
        return x, w, event


cupy_ep.Buffer = StandIn
testing.to_device = testing.to_host = lambda a: a
testing.poison_pool = lambda *a, **k: None
testing._synchronized = lambda result: result
bench_common.exit_unless_gpus = lambda comm, script: None

sys.exit(smoke_multihost.main(sys.argv[2:]))
