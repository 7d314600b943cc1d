"""Normal mode across NVLink domains (internode), on virtual hosts of one machine, with an NCCL baseline.

    mpiexec -n 4 python scripts/bench_internode.py --num-nvl-peers 2 [--iters 10] [--json PATH]
    mpiexec -n 4 python scripts/bench_internode.py --num-nvl-peers 1

Workload (DeepEP's test_internode): 4096 tokens per rank, hidden 7168, top-8 of 256 experts
(rounded down to a multiple of the ranks) with group-limited routing: scores |N(0,1)| + 1,
each token keeps the 4 domains whose best expert scores highest and takes its top-8 experts
there (with 4 domains or fewer this is a plain random top-8). ``--num-nvl-peers P`` makes
domains of P consecutive ranks (``Buffer(num_nvl_peers=P)``): on 4 GPUs ``2`` gives 2 domains
x 2 ranks, ``1`` gives 4 x 1. Buffer sizes from the size hints
(``get_nvl_buffer_size_hint(T, H, R, 8, num_nvl_peers=P, num_max_recv_tokens=R*T)``,
``get_rdma_buffer_size_hint(T, H, R, P, 8)``).

Per operation (layout, dispatch FP8, dispatch bf16, combine bf16), as in bench_intranode.py:
kernel time (``buf.profile()`` -> ``kernel_times_us()``, median), whole-call time (CUDA
events around the Python call after an MPI barrier, median; host time beside it) and the
whole call's phases (``call_phases_us()``); per-rank medians, worst rank shown.

Bytes, per rank, as DeepEP's internode test counts them:

* "RDMA" bytes = (token, destination domain) pairs of the tokens this rank sends, own domain
  included (DeepEP's ``num_rdma_token_sent``), x row bytes; combine: the same (bf16). The
  mirror count (records this rank receives as forwarder) is in the JSON (``rdma_recv_pairs``);
  with this symmetric routing both agree within a percent or so;
* "NVL" bytes = rows this rank receives x row bytes (dispatch), the same for combine;
* row bytes: bf16 2H, FP8 H + H/128 x 4 (data + scales).

Forwarding saving: bytes that cross between domains per rank (a token goes once per
destination domain other than its own) against what a per-rank all-to-all sends across
domains (once per destination rank in another domain), per rank and per token. The cross-
domain leg is NVLink on this host; the time the same bytes would take through one 400 Gb/s
NIC per GPU (``--nic-gbps 50`` GB/s) is printed beside it, with the "RDMA" GB/s that this
NIC-bound time would give, to read the numbers against DeepEP's published 43-58 GB/s per
rank at EP16-64.

Per destination domain, what enters it from the other domains' ranks: records as forwarded
(one per token and domain) against the rows a per-rank all-to-all would send there (one per
token and rank of that domain), in row bytes. With ``CUPY_EP_TEST_PROXY_TRANSPORT=1`` (NVSHMEM's
UCX transport over TCP on the loopback, docs/multihost.md) the report says so: its times then
say nothing about NICs, while the bytes and records per destination domain are real.

Baseline (same run): NCCL grouped send/recv all-to-all-v of the same rows (once per (token,
destination rank)), dispatch bf16 / FP8 and combine (with scatter-add), whole-call timed; its
GB/s use the "NVL" count.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

OPS = ("layout", "dispatch_fp8", "dispatch_bf16", "combine")
OP_LABELS = {"layout": "layout", "dispatch_fp8": "dispatch FP8", "dispatch_bf16": "dispatch bf16",
             "combine": "combine bf16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-nvl-peers", type=int, required=True, help="ranks per NVLink domain (virtual host)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256, help="rounded down to a multiple of the ranks")
    p.add_argument("--topk-groups", type=int, default=4, help="domains a token may pick experts in (default 4)")
    p.add_argument("--config", default=None, help="SMS/THREADS/RECEIVERS[/CHUNK] (default: the Buffer's default)")
    p.add_argument("--max-recv-tokens", type=int, default=None,
                   help="num_max_recv_tokens of the NVLink size hint (default: ranks x tokens, the worst case)")
    p.add_argument("--nic-gbps", type=float, default=50.0, help="GB/s per NIC for the NIC-bound estimate (400 Gb/s: 50)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--timeout-s", type=float, default=60.0, help="Buffer timeout_s")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.num_nvl_peers < 1 or args.iters < 1 or args.warmup < 1:
        p.error("--num-nvl-peers, --iters and --warmup must be >= 1")
    if args.config:
        try:
            args.config_spec = bc.parse_config_spec(args.config)
            from cupy_ep import Config

            sms, threads, receivers, chunk = args.config_spec
            Config(num_sms=sms, num_threads=threads, num_receivers=receivers, chunk_tokens=chunk)
        except ValueError as e:
            p.error(str(e))
    else:
        args.config_spec = None
    return args


def traffic_bytes(tr: dict, hidden: int, recv_rows: int, rdma_recv_pairs: int, nic_gbps: float) -> dict:
    """Byte counts of one rank from :func:`bench_common.domain_traffic` (``tr``), the rows it
    received and the records it received as forwarder."""
    out = dict(tr)
    out["recv_rows"] = int(recv_rows)
    out["rdma_recv_pairs"] = int(rdma_recv_pairs)
    for kind, fp8 in (("fp8", True), ("bf16", False)):
        rb = bc.row_bytes(hidden, fp8)
        out[f"rdma_bytes_{kind}"] = tr["domain_pairs"] * rb
        out[f"nvl_bytes_{kind}"] = recv_rows * rb
        out[f"cross_bytes_{kind}"] = tr["remote_domain_pairs"] * rb
        out[f"a2a_cross_bytes_{kind}"] = tr["remote_rank_pairs"] * rb
        out[f"nic_us_{kind}"] = bc.nic_time_us(out[f"cross_bytes_{kind}"], nic_gbps)
        out[f"a2a_nic_us_{kind}"] = bc.nic_time_us(out[f"a2a_cross_bytes_{kind}"], nic_gbps)
        nic = out[f"nic_us_{kind}"]
        out[f"nic_bound_rdma_GBps_{kind}"] = bc.gbps(out[f"rdma_bytes_{kind}"], nic) if nic else None
    return out


def main():
    args = parse_args()
    bc.set_env_defaults()
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    bc.exit_unless_gpus(comm, "bench_internode.py")
    import cupy

    import cupy_ep
    from cupy_ep import testing, transport_env

    rank, r = comm.Get_rank(), comm.Get_size()
    p_nvl = args.num_nvl_peers
    if r % p_nvl:
        raise ValueError(f"--num-nvl-peers {p_nvl} does not divide {r} ranks")
    n_dom = r // p_nvl
    t, h, k = args.tokens, args.hidden, args.topk
    e = bc.round_experts(args.experts, r)
    if e % n_dom:
        raise ValueError(f"{e} experts do not split over {n_dom} domains")
    t0 = time.time()
    nvl_bytes = cupy_ep.Buffer.get_nvl_buffer_size_hint(t, h, r, k, num_nvl_peers=p_nvl,
                                                        num_max_recv_tokens=args.max_recv_tokens or r * t)
    rdma_bytes = cupy_ep.Buffer.get_rdma_buffer_size_hint(t, h, r, p_nvl, k)
    buf = cupy_ep.Buffer(comm, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes, num_nvl_peers=p_nvl,
                         timeout_s=args.timeout_s)
    if args.config_spec:
        sms, threads, receivers, chunk = args.config_spec
        cfg = cupy_ep.Config(num_sms=sms, num_threads=threads, num_receivers=receivers, chunk_tokens=chunk)
    else:
        cfg = cupy_ep.Config()
    nc = None if args.no_baseline else bc.NcclAllToAll(comm)
    if rank == 0:
        print(f"# bench_internode: {r} x {bc.device_name()}, {n_dom} domains x {p_nvl} ranks, {t} tokens/rank, "
              f"hidden {h}, top-{k} of {e} (groups <= {args.topk_groups}), config {bc.config_label(cfg)}; buffers "
              f"NVL {nvl_bytes / 2**20:.0f} MiB, RDMA {rdma_bytes / 2**20:.0f} MiB per rank", flush=True)

    rng = np.random.default_rng([2024, rank])
    idx_np = bc.group_limited_topk(rng, t, e, k, n_dom, args.topk_groups)
    x = testing.to_device(testing.make_x(rng, t, h))
    x_fp8 = cupy_ep.per_token_cast_to_fp8(x)
    topk_idx = cupy.asarray(idx_np)
    topk_w = cupy.asarray(testing.make_weights(rng, t, k))
    tr = bc.domain_traffic(idx_np, e, r, p_nvl, rank)
    all_counts = comm.allgather(tr["domain_counts"])
    rdma_recv_pairs = bc.forwarded_records(all_counts, p_nvl, rank)

    res = {}
    layout = buf.get_dispatch_layout(topk_idx, e)
    res["layout"], _ = bc.measure_call(comm, buf, lambda: buf.get_dispatch_layout(topk_idx, e), ("layout",),
                                       args.iters, args.warmup)
    per_rank, per_rdma, per_expert, in_rank, _ = layout
    rt = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
              num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_w)
    res["dispatch_fp8"], out = bc.measure_call(comm, buf, lambda: buf.dispatch(x_fp8, **rt, config=cfg),
                                               ("dispatch", "notify"), args.iters, args.warmup)
    rows = int(out[0][0].shape[0])
    del out
    res["dispatch_bf16"], out = bc.measure_call(comm, buf, lambda: buf.dispatch(x, **rt, config=cfg),
                                                ("dispatch", "notify"), args.iters, args.warmup)
    recv_x, handle = out[0], out[4]
    res["combine"], _ = bc.measure_call(comm, buf, lambda: buf.combine(recv_x, handle, config=cfg), ("combine",),
                                        args.iters, args.warmup)
    bytes_ = traffic_bytes(tr, h, rows, rdma_recv_pairs, args.nic_gbps)
    for op, kind in (("dispatch_fp8", "fp8"), ("dispatch_bf16", "bf16"), ("combine", "bf16")):
        res[op]["rdma_bytes"] = bytes_[f"rdma_bytes_{kind}"]
        res[op]["nvl_bytes"] = bytes_[f"nvl_bytes_{kind}"]
    baseline = None
    if nc is not None:
        baseline = bc.nccl_normal_baseline(comm, nc, x, x_fp8, in_rank, h, args.iters)
        for op in ("dispatch_fp8", "dispatch_bf16", "combine"):
            baseline[op]["nvl_bytes"] = baseline[op].pop("bytes")

    gathered = comm.gather((res, bytes_, baseline), root=0)
    comm.Barrier()
    if nc is not None:
        nc.destroy()
    buf.destroy()
    cupy.cuda.runtime.deviceSynchronize()
    if rank != 0:
        return

    ops = {op: bc.aggregate_op([g[0][op] for g in gathered]) for op in OPS}
    traffic = [g[1] for g in gathered]
    base = None
    if gathered[0][2] is not None:
        base = {op: bc.aggregate_op([g[2][op] for g in gathered]) for op in ("dispatch_fp8", "dispatch_bf16", "combine")}
    transport = dict(transport=transport_env.describe(), proxy=transport_env.proxy_requested())
    report(ops, traffic, base, args, dict(ranks=r, domains=n_dom, peers=p_nvl, experts=e, config=bc.config_label(cfg),
                                          device=bc.device_name(), total_s=time.time() - t0, **transport))
    if args.json:
        bc.write_json(args.json, dict(bench="internode", device=bc.device_name(), ranks=r, num_nvl_peers=p_nvl,
                                      domains=n_dom, tokens=t, hidden=h, topk=k, experts=e,
                                      topk_groups=args.topk_groups, config=bc.config_dict(cfg), iters=args.iters,
                                      nic_gbps=args.nic_gbps, nvl_bytes=nvl_bytes, rdma_bytes=rdma_bytes, ops=ops,
                                      traffic=traffic, inbound=bc.inbound_cross_domain(traffic, p_nvl),
                                      baseline=base, argv=sys.argv[1:], total_s=time.time() - t0, **transport))
        print(f"\n# wrote {args.json}")
    print_summary(ops, traffic, base, args, r, n_dom, p_nvl)


def _mean(traffic, key):
    return float(np.mean([tr[key] for tr in traffic]))


def report(ops, traffic, base, args, info) -> None:
    t = args.tokens
    print(f"\n# cupy_ep internode, {info['ranks']} x {info['device']}, {info['domains']} domains x {info['peers']} "
          f"ranks (virtual hosts), {t} tokens/rank, hidden {args.hidden}, top-{args.topk} of {info['experts']}, "
          f"config {info['config']}; medians over {args.iters} calls, worst rank; total {info['total_s']:.0f} s")
    print("# RDMA GB/s: (token, destination domain) pairs sent, own domain included, x row bytes; NVL GB/s: rows "
          "received x row bytes (DeepEP's internode counts)")
    print(f"# cross-domain transport: {info['transport']}")
    if info["proxy"]:
        print("# proxy test mode: the cross-domain leg is TCP on the loopback through NVSHMEM's proxy thread, so "
              "its times say nothing about NICs; the bytes and records per destination domain are real")
    table = []
    for op in OPS:
        o = ops[op]
        b = (base or {}).get(op) or {}
        table.append([OP_LABELS[op], bc.fmt(o.get("kernel_us")), bc.fmt(o.get("call_us")), bc.fmt(o.get("host_us")),
                      bc.fmt(o.get("rdma_kernel_GBps"), ".0f", 6), bc.fmt(o.get("rdma_call_GBps"), ".0f", 6),
                      bc.fmt(o.get("nvl_kernel_GBps"), ".0f", 6), bc.fmt(o.get("nvl_call_GBps"), ".0f", 6),
                      bc.fmt(b.get("call_us")), bc.fmt(b.get("nvl_call_GBps"), ".0f", 6)])
    bc.print_table(["op", "kernel us", "call us", "host us", "RDMA k", "RDMA c", "NVL k", "NVL c", "NCCL us", "GB/s"],
                   table, [14, 9, 9, 8, 6, 6, 6, 6, 9, 6])

    print("\nwhole-call breakdown (worst rank, medians; GPU-timeline us / host us per phase, kernel us beside "
          "the phase its launch ends):")
    bc.print_breakdown([(OP_LABELS[op], ops[op], op.split("_")[0]) for op in OPS])

    print(f"\ntraffic per rank (mean over ranks; {t} tokens):")
    dp, rdp = _mean(traffic, "domain_pairs"), _mean(traffic, "remote_domain_pairs")
    rp, rrp = _mean(traffic, "rank_pairs"), _mean(traffic, "remote_rank_pairs")
    print(f"  destinations per token: {dp / t:.2f} domains ({rdp / t:.2f} other domains), {rp / t:.2f} ranks "
          f"({rrp / t:.2f} in other domains); rows received {_mean(traffic, 'recv_rows'):.0f}; forwarder records "
          f"received {_mean(traffic, 'rdma_recv_pairs'):.0f} vs sent pairs {dp:.0f}")
    table = []
    for kind, ops_of in (("fp8", ["dispatch_fp8"]), ("bf16", ["dispatch_bf16", "combine"])):
        cross, a2a = _mean(traffic, f"cross_bytes_{kind}"), _mean(traffic, f"a2a_cross_bytes_{kind}")
        nic, a2a_nic = _mean(traffic, f"nic_us_{kind}"), _mean(traffic, f"a2a_nic_us_{kind}")
        bound = bc.gbps(_mean(traffic, f"rdma_bytes_{kind}"), nic) if nic else None
        for op in ops_of:
            table.append(["  " + OP_LABELS[op], f"{cross / 1e6:.1f}", f"{a2a / 1e6:.1f}",
                          f"{cross / t:.0f}", f"{a2a / t:.0f}", "-" if not cross else f"{a2a / cross:.2f}",
                          f"{nic:.0f}", f"{a2a_nic:.0f}", bc.fmt(ops[op].get("kernel_us"), ".0f", 7),
                          bc.fmt(bound, ".0f", 6)])
    print(f"  cross-domain bytes per rank and per token: forwarded (once per destination domain) vs a per-rank "
          f"all-to-all; NIC time at {args.nic_gbps:.0f} GB/s per rank; RDMA GB/s if NIC-bound")
    bc.print_table(["  op", "fwd MB", "a2a MB", "fwd B/tok", "a2a B/tok", "saving", "NIC us", "a2a NIC", "kern us",
                    "RDMA@NIC"], table, [16, 7, 7, 9, 9, 7, 7, 8, 8, 8])
    print()
    print_inbound(bc.inbound_cross_domain(traffic, info["peers"]), args.hidden)
    lo, hi = bc.DEEPEP_INTERNODE_PUBLISHED_RDMA_GBPS
    leg = "TCP on the loopback" if info["proxy"] else "NVLink"
    print(f"  (DeepEP published, H800 + CX7 400 Gb/s, EP16-64: {lo:.0f}-{hi:.0f} GB/s RDMA per rank; this host's "
          f"cross-domain leg is {leg}, so only the NIC-bound column compares to it)")


def print_inbound(inbound: list, hidden: int) -> None:
    """Per destination domain, the bytes that enter it from the other domains' ranks."""
    print("  into each domain from the other domains' ranks (all of them): forwarded records (one per "
          "token and domain) vs per-rank all-to-all rows (one per token and rank); MB of row bytes")
    table = []
    for d in inbound:
        recs, rows = d["records"], d["a2a_rows"]
        mb = [f"{n * bc.row_bytes(hidden, fp8) / 1e6:.1f}" for fp8 in (False, True) for n in (recs, rows)]
        table.append([f"  {d['domain']}", f"{recs}", f"{rows}", *mb, "-" if not recs else f"{rows / recs:.2f}"])
    bc.print_table(["  domain", "records", "a2a rows", "bf16 MB", "a2a MB", "FP8 MB", "a2a MB", "a2a/fwd"],
                   table, [8, 8, 9, 8, 8, 8, 8, 8])


def print_summary(ops, traffic, base, args, r, n_dom, p_nvl) -> None:
    print(f"\n=== summary table: internode {n_dom} domains x {p_nvl}; kernel (whole call), worst rank")
    table = []
    for op in OPS:
        o = ops[op]
        b = (base or {}).get(op) or {}
        table.append([OP_LABELS[op], f"{o.get('kernel_us') or 0:.0f} ({o.get('call_us') or 0:.0f})",
                      "-" if op == "layout" else f"{o.get('rdma_kernel_GBps') or 0:.0f} ({o.get('rdma_call_GBps') or 0:.0f})",
                      "-" if op == "layout" else f"{o.get('nvl_kernel_GBps') or 0:.0f} ({o.get('nvl_call_GBps') or 0:.0f})",
                      "-" if not b else f"{b.get('call_us') or 0:.0f} / {b.get('nvl_call_GBps') or 0:.0f}"])
    bc.print_table(["op", "us", "RDMA GB/s", "NVL GB/s", "NCCL us / GB/s"], table, [14, 13, 11, 11, 15])
    o = ops
    print(f"SUMMARY internode {r} ranks {n_dom}x{p_nvl}: kernel us FP8 {o['dispatch_fp8'].get('kernel_us') or 0:.0f} / "
          f"bf16 {o['dispatch_bf16'].get('kernel_us') or 0:.0f} / combine {o['combine'].get('kernel_us') or 0:.0f}; "
          f"RDMA GB/s {o['dispatch_fp8'].get('rdma_kernel_GBps') or 0:.0f} / "
          f"{o['dispatch_bf16'].get('rdma_kernel_GBps') or 0:.0f} / {o['combine'].get('rdma_kernel_GBps') or 0:.0f}; "
          f"NVL GB/s {o['dispatch_fp8'].get('nvl_kernel_GBps') or 0:.0f} / "
          f"{o['dispatch_bf16'].get('nvl_kernel_GBps') or 0:.0f} / {o['combine'].get('nvl_kernel_GBps') or 0:.0f}")


if __name__ == "__main__":
    from cupy_ep.testing import run_or_abort

    run_or_abort(main)
