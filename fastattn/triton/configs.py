"""Launch configurations: autotuned lists on a GPU, one fixed small config under the interpreter.

Attention tiles are chosen per head-dim bucket (the padded max(D, Dv): 64, 128, 256) because
the head dim sets how much of each tile lives in registers and shared memory:
  * forward (BLOCK_M queries x BLOCK_N keys): small head dims afford 128x128 tiles and deep
    pipelines (num_stages 3-4); at 128 the q tile and the fp32 accumulator take most of the
    registers, so BLOCK_N drops to 32-64; at 256 BLOCK_M drops to 64 (or 128 with 8 warps)
    and num_stages to 1-2 so k / v stages fit in shared memory (A100: 163 KiB, H100: 227 KiB).
  * backward dk/dv (program per BLOCK_N keys, loop over BLOCK_M queries) keeps dk and dv
    accumulators (2 x BLOCK_N x D fp32) in registers, so BLOCK_N is the large side;
    backward dq (program per BLOCK_M queries) mirrors it with BLOCK_M the large side.
Every list holds a conservative entry (small tiles) that fits on both GPUs, so fp32 inputs
(which take the next bucket up, see head_bucket) always have a config that fits. The
autotune key is the head-dim bucket plus the flags and a power-of-two sequence-length bucket,
so a model tunes once per (layer shape, length bucket) rather than once per exact length.
`python -m fastattn.triton.compile_check` compiles every entry for sm_80 / sm_90 and reports
shared-memory use.
"""
import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim bucket, chosen with compile_check's
# register / spill / shared-memory report on sm_80 and sm_90 (bf16, causal): entries that
# spilled on either were dropped, except at 256 where the best dk/dv entries spill 24-316 B.
ATTN_FWD = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (64, 64, 4, 4), (128, 32, 4, 3), (128, 128, 8, 2)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 1)],
}
ATTN_BWD_DKDV = {
    64: [(32, 128, 8, 3), (64, 64, 4, 2), (32, 64, 8, 2), (16, 128, 8, 2)],
    128: [(32, 64, 8, 2), (16, 128, 8, 2), (32, 128, 8, 2), (32, 32, 4, 2)],
    256: [(16, 32, 4, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
}
ATTN_BWD_DQ = {
    64: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2)],
    128: [(128, 32, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
    256: [(64, 32, 4, 2), (128, 32, 8, 2), (64, 16, 4, 2), (32, 32, 4, 2)],
}
ATTN_KEY = ["D_PAD", "DV_PAD", "MASK_KIND", "ROW_SHARED", "WINDOW", "SOFTCAP", "ALIBI", "VARLEN", "DROPOUT", "seq_bucket"]

# Softmax rows are read in chunks of up to SOFTMAX_MAX_BLOCK_C columns (longer rows take the
# two-pass path); short rows are packed BLOCK_R to a program (see softmax_blocks). Only the
# warp count is tuned, per chunk width.
SOFTMAX_MAX_BLOCK_C = 4096
SOFTMAX_WARPS = (2, 4, 8, 16)
SOFTMAX_KEY = ["BLOCK_C", "BLOCK_R", "ONE_PASS"]

# Under TRITON_INTERPRET=1: small tiles (the interpreter runs them with numpy), and a short
# softmax chunk so tests reach the multi-block paths with small shapes.
INTERPRET_ATTN_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}
INTERPRET_SOFTMAX_MAX_BLOCK_C = 128

# KV-cache decoding (kernels._attn_fwd_kvcache_kernel), one fixed config per head-dim bucket,
# not yet measured: chosen by arithmetic for an H100 (132 SMs, 227 KiB shared memory). Decoding
# is bound by reading K and V (each key serves only group * Sq rows), so the aim is many loads
# in flight: BLOCK_N keys per tile, num_stages tiles prefetched, and small programs so that
# several share an SM. At D = 128, bf16, a 64-key K tile plus its V tile is 32 KiB; at 256 the
# tile halves (32 keys) and the stages drop to 2 to keep the fp32 accumulator (rows x 256) in
# 4 warps' registers. compile_check (sm_90, GQA group of 8, every option): 67 / 122 / 161
# registers at D = 64 / 128 / 256, no spills, 20 / 38 / 41 KiB of shared memory.
# Rows per program (queries x group heads) are capped at KVCACHE_MAX_ROWS (prefill chunks
# take several query blocks) and never below 16, the smallest M tl.dot takes.
# (BLOCK_N, num_warps, num_stages) per head-dim bucket (head_bucket).
KVCACHE = {64: (64, 4, 3), 128: (64, 4, 3), 256: (32, 4, 2)}
KVCACHE_MAX_ROWS = {64: 64, 128: 64, 256: 32}
MIN_DOT_ROWS = 16
# Split-KV: when B * Hkv * query blocks programs leave SMs idle, each row's keys are split
# into up to KVCACHE_MAX_SPLITS equal shares of the row's own length (read on the device), at
# most one per KVCACHE_MIN_SPLIT_BLOCKS key blocks of room, so that about one program per SM
# runs; the partial results are merged in a second, small kernel.
KVCACHE_MAX_SPLITS = 64
KVCACHE_MIN_SPLIT_BLOCKS = 4
KVCACHE_COMBINE_ROWS = 16

# Under TRITON_INTERPRET=1: key tiles of 16, so pages of 8 and 32 fall on both sides of a
# tile, and a pretend device of 4 SMs with one-block splits, so small batches take the split path.
INTERPRET_KVCACHE_BLOCK_N = 16
INTERPRET_KVCACHE_MAX_ROWS = 16
INTERPRET_SMS = 4
INTERPRET_MIN_SPLIT_BLOCKS = 1


def kvcache_configs(bucket):
    block_n, warps, stages = KVCACHE[bucket]
    return [triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)]


def kvcache_block_q(sq, group_pad, max_rows):
    """Queries per program: the tile holds BLOCK_Q * group_pad rows, up to max_rows (a prefill
    chunk takes several programs) and at least MIN_DOT_ROWS."""
    fit = max(1, max_rows // group_pad)
    return max(MIN_DOT_ROWS // group_pad, min(triton.next_power_of_2(max(sq, 1)), fit), 1)


def kvcache_splits(programs, capacity, block_n, sms, min_split_blocks):
    """Splits of each row's keys: one when `programs` fill the `sms`, else about
    sms / programs, so that a row of `capacity` keys (the most it can hold: its length is on
    the device) gives each split at least min_split_blocks key blocks."""
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, programs), capacity // (block_n * min_split_blocks), KVCACHE_MAX_SPLITS))


def head_bucket(d_pad, dv_pad, element_size):
    """Config bucket by tile bytes per row: fp32 rows weigh as much as 16-bit rows twice as
    wide (fp32 with D=64 takes the D=128 configs; anything wider than 256 the 256 ones)."""
    width = max(d_pad, dv_pad) * element_size // 2
    return next((b for b in (64, 128) if width <= b), 256)


def attention_configs(table, bucket):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table[bucket]
    ]


def softmax_configs():
    return [triton.Config({}, num_warps=w) for w in SOFTMAX_WARPS]


def softmax_blocks(n_cols, max_block_c):
    """(BLOCK_C, BLOCK_R): a chunk as wide as the row up to max_block_c, and enough rows per
    program to give it about 2048 elements."""
    block_c = min(triton.next_power_of_2(max(n_cols, 1)), max_block_c)
    return block_c, max(1, min(16, 2048 // block_c))
