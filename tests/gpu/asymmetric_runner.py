"""What the GPU runners of tests/asymmetric_cases.py share (tests/gpu/test_asymmetric_gpu.py,
tests/gpu/test_asymmetric_internode_gpu.py): the Buffers' timeout, how a "new shape" call is made
new to the process again, and the loop over the cases."""

TIMEOUT_S = 20.0   # ranks sharing one GPU are slow; the prompt cases must take under half of it


def forgetting_compiled(buffers):
    """``as_new_shape`` of asymmetric_cases: runs a call, then the process forgets the modules it
    used (kept in the compiler's disk cache) and the Buffers' engines their kernel lookups, so
    that the next call of that shape is a first call again (a compile agreement, no compile)."""
    from cupy_ep import engine

    def forget_lookups():
        for buf in buffers:
            for eng in buf._engines:
                eng._memo.clear()
                getattr(eng, "_functions", {}).clear()

    def as_new_shape(call):
        # With the process's modules and the engines' lookups set aside, the call loads (from the
        # disk cache) every module it uses, also one an earlier case loaded: those are forgotten.
        kept = dict(engine._MODULES)
        engine._MODULES.clear()
        forget_lookups()
        call()
        used = set(engine._MODULES)
        engine._MODULES.clear()
        engine._MODULES.update({key: m for key, m in kept.items() if key not in used})
        forget_lookups()

    return as_new_shape


def run_cases(comm, cases, buffers, round_trip) -> tuple:
    """Runs ``cases`` in order on every rank, judged together; after each, ``round_trip(case)``
    (a checked round trip on the case's Buffer). Stops after a case that left one of ``buffers``
    unusable on some rank. Returns (failures, the number of cases run)."""
    failures, ran = [], 0
    for case in cases:
        ran += 1
        outcome = case.run(comm.Get_rank() == case.odd_rank)
        bad = comm.allgather(outcome)
        if any(o is not None for o in bad):
            failures.append(f"{case.name}: " + "; ".join(f"rank {r}: {o}" for r, o in enumerate(bad) if o))
        alive = all(b.is_available() for b in buffers)
        unusable = [r for r, ok in enumerate(comm.allgather(alive)) if not ok]
        if unusable:   # decided together: a rank leaving the loop alone would hang the others
            failures.append(f"{case.name}: a Buffer became unusable on rank(s) {unusable}")
            break
        round_trip(case)
    return failures, ran
