"""Helpers shared by the GPU test modules (pytest puts this directory on sys.path)."""


def poison_pool(num_bytes: int = 1536 << 20) -> None:
    """Fills free memory-pool blocks with 0xFF (NaN in bf16/f32, -1 in ints) so that outputs a
    kernel failed to write show up in the checks."""
    import cupy

    junk = cupy.empty(num_bytes, dtype=cupy.uint8)
    junk.fill(0xFF)
    cupy.cuda.get_current_stream().synchronize()
    del junk
