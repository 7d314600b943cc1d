"""scripts/bench_internode.py's byte counts and report on made-up routing (no GPU): traffic per
destination domain against a per-rank all-to-all, and the proxy-transport note."""
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_common as bc  # noqa: E402
import bench_internode  # noqa: E402

# 4 ranks, 2 domains x 2, 8 experts (2 per rank); rank r's tokens pick experts e
ROUTING = {0: [[0, 2], [4, 6], [5, 7]],     # rank 0: own domain; domain 1 (ranks 2, 3); domain 1 (rank 2, 3)
           1: [[1, 4], [6, 7]],             # rank 1: domains 0+1 (ranks 0, 2); domain 1 (rank 3)
           2: [[0, 1], [2, 4]],             # rank 2: domain 0 (rank 0); domains 0+1 (ranks 1, 2)
           3: [[7, 6]]}                     # rank 3: own domain only (rank 3)


def _traffic():
    return [bc.domain_traffic(np.array(ROUTING[r]), 8, 4, 2, r) for r in range(4)]


def test_domain_traffic_counts_domains_and_ranks():
    tr = _traffic()
    assert tr[0]["domain_counts"] == [1, 2] and tr[0]["domain_rank_counts"] == [2, 4]
    assert tr[1]["domain_counts"] == [1, 2] and tr[1]["domain_rank_counts"] == [1, 2]
    assert tr[2]["domain_counts"] == [2, 1] and tr[2]["domain_rank_counts"] == [2, 1]
    assert tr[3]["domain_counts"] == [0, 1] and tr[3]["domain_rank_counts"] == [0, 1]
    assert tr[0]["remote_domain_pairs"] == 2 and tr[0]["remote_rank_pairs"] == 4


def test_inbound_counts_only_other_domains_sources():
    inbound = bc.inbound_cross_domain(_traffic(), 2)
    # into domain 0: from ranks 2 and 3; into domain 1: from ranks 0 and 1
    assert inbound == [dict(domain=0, records=2, a2a_rows=2), dict(domain=1, records=4, a2a_rows=6)]


def _ops():
    return {op: {"kernel_us": 10.0, "call_us": 12.0, "host_us": 3.0} for op in bench_internode.OPS}


def test_report_prints_the_inbound_table_and_the_proxy_note(capsys):
    tr = _traffic()
    for t in tr:
        t.update(recv_rows=3, rdma_recv_pairs=2)
        t.update(bench_internode.traffic_bytes(t, 256, 3, 2, 50.0))
    args = Namespace(tokens=3, hidden=256, topk=2, iters=1, nic_gbps=50.0)
    info = dict(ranks=4, domains=2, peers=2, experts=8, config="c", device="d", total_s=1.0,
                transport="NVSHMEM remote transport ucx, P2P off", proxy=True)
    bench_internode.report(_ops(), tr, None, args, info)
    out = capsys.readouterr().out
    assert "# cross-domain transport: NVSHMEM remote transport ucx, P2P off" in out
    assert "its times say nothing about NICs" in out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()[:1] in "01" and len(ln.split()) == 8}
    assert rows["1"][1:3] == ["4", "6"] and rows["1"][-1] == "1.50"        # records, a2a rows, a2a/fwd
    assert rows["1"][3] == f"{4 * 512 / 1e6:.1f}"                           # bf16 MB: 4 records x 2H
    info["proxy"] = False
    bench_internode.report(_ops(), tr, None, args, info)
    assert "say nothing about NICs" not in capsys.readouterr().out
