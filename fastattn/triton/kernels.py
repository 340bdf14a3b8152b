"""Triton kernels: flash attention (forward, backward) and the fused scaled masked softmax.

One parametrised kernel per job; constexpr flags select the mask kind, the window, the
softcap and mask-gradient output so the compiler drops what a call does not use. Conventions:
  * Visibility: query i sees key j iff i + win_lo <= j <= i + win_hi (the launcher turns the
    window and its alignment into these offsets; an unbounded side lies past every key).
    `_visible` is that rule per element, `_key_range` / `_query_range` the blocks a block of
    queries / keys has to visit; every kernel uses them.
  * softcap: scores become softcap * tanh(s / softcap) after scaling, before the mask.
  * ALiBi (ALIBI): -slope * |i' - j| joins the (capped) scores before the mask, slope that of
    the sequence and query head (`_alibi_slope`), i' = i + diagonal: query 0's key among the
    sequence's keys (Sk - Sq bottom-right, 0 top-left), the window rule's diagonal.
  * Scores stay in natural units, as torch computes them (scale * q.k + mask); exp(s - max) is
    exp2((s - max) * log2(e)) with the max subtracted first, so large logits lose no precision
    to a base-2 rescale and finite masks (finfo.min padding) cannot overflow to -inf.
  * Masks arrive expanded to (B, Hq, Sq, Sk) and are read tile by tile through their strides.
    Both kinds become one additive bias (bool: 0 / -inf); a -inf entry hides its key whatever
    the score (even NaN), as torch's masked_fill does. When the mask's query stride is 0
    (key-padding masks) a single row of BLOCK_N entries is read per tile.
  * A tile whose bias hides every entry is skipped before its matmuls are run. This is how
    hidden key blocks of a padding mask cost nothing.
  * The forward saves each row's max score and sum of exp(score - max) (softmax_stats); the
    backward recomputes P from them rather than from lse, whose fp32 rounding (|lse| * 2^-24)
    would cost P many times PyTorch's accuracy at large logits.
  * Head dims are padded to a power of two in registers (D_PAD >= 16) and the tail is masked.
  * Rows that see no key produce zeros, lse = -inf, row max -inf and row sum 0; in the
    backward pass their probabilities are 0, so their gradients are 0.
  * Dropout (DROPOUT): `_dropout_keep` regenerates each tile's keep decisions from the call's
    (seed, offset), read from the rng_state tensor in device memory; no mask is stored. The
    softmax statistics and lse stay those of the undropped softmax; kept probabilities reach V
    scaled by keep_scale = 1 / (1 - p).
  * KV-cache decoding (`_attn_fwd_kvcache_kernel`, forward only): the new queries of every query
    head of a GQA group are one tile's rows, so each K / V tile is read once per group; keys are
    found through `_cache_slots` (pages through the block table) and end at each row's length,
    read on the device. When the rows cannot fill the device their keys are split across
    programs, and `_kvcache_combine_kernel` merges the partial results by their lse in split
    order (deterministic).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)
# -inf is written float("-inf") in the kernels, not as a module constant: torch.compile copies
# module constants into its generated source by repr, and repr(-inf) is not Python.

MASK_NONE = 0
MASK_BOOL = 1
MASK_ADDITIVE = 2


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """a @ b (+ acc) accumulated in fp32. PRECISION "upcast" (launchers use it only
    interpreted) sums exact float64 products and rounds once to fp32: the Triton interpreter
    multiplies bf16 storage bits as integers, and its BLAS sums q @ k^T and k @ q^T in
    different orders, so a backward that recomputes scores transposed would differ from the
    forward's by an ulp, which at large logits is many times PyTorch's error in P. On a GPU
    each element's products are summed in the same order in both orientations."""
    if PRECISION == "upcast":
        product = tl.dot(a.to(tl.float64), b.to(tl.float64), None, input_precision="ieee").to(tl.float32)
        return product if acc is None else acc + product
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """x in dtype, rounded to nearest even. Interpreted ("upcast", see _dot), fp32 -> bf16 is
    rounded by hand: the interpreter truncates, which biases every P and output element
    towards zero (on a GPU the conversion rounds to nearest)."""
    if PRECISION == "upcast" and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile_index(offs_m, offs_n, TRANSPOSED: tl.constexpr):
    """2-d query / key index grids of a (BLOCK_M, BLOCK_N) tile, or of its transpose."""
    if TRANSPOSED:
        m2 = offs_m[None, :]
        n2 = offs_n[:, None]
    else:
        m2 = offs_m[:, None]
        n2 = offs_n[None, :]
    return m2, n2


@triton.jit
def _mask_bias(mask_base, offs_m, offs_n, Sq, Sk, stride_mm, stride_mn,
               MASK_KIND: tl.constexpr, ROW_SHARED: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Additive bias of one tile: (BLOCK_M, BLOCK_N) ((BLOCK_N, BLOCK_M) when
    TRANSPOSED), or a single key vector broadcast over queries when every query row shares
    the mask row (ROW_SHARED). Out-of-range entries are -inf."""
    m2, n2 = _tile_index(offs_m, offs_n, TRANSPOSED)
    if ROW_SHARED:
        ok = n2 < Sk
        ptrs = mask_base + n2 * stride_mn
    else:
        ok = (m2 < Sq) & (n2 < Sk)
        ptrs = mask_base + m2 * stride_mm + n2 * stride_mn
    if MASK_KIND == 1:
        bias = tl.where(tl.load(ptrs, mask=ok, other=0) != 0, 0.0, float("-inf"))
    else:
        bias = tl.load(ptrs, mask=ok, other=float("-inf")).to(tl.float32)
    return bias


@triton.jit
def _any_visible(bias):
    """Whether a tile's bias shows any key: an entry other than -inf (NaN counts, so that it
    reaches the output; the GPU's max would drop it)."""
    return tl.max((bias != float("-inf")).to(tl.int32)) > 0


@triton.jit
def _exp_shifted(s, shift):
    """exp(s - shift), the shift subtracted before the base-2 rescale."""
    return tl.exp2((s - shift) * LOG2E)


@triton.jit
def _tanh(x, PRECISION: tl.constexpr):
    """tanh in fp32. Interpreted ("upcast", see _dot) it is computed in float64 from exp, as the
    interpreter has no libdevice tanh; 1 - 2 / (e^2x + 1) loses nothing there."""
    if PRECISION == "upcast":
        return (1.0 - 2.0 / (tl.exp(2.0 * x.to(tl.float64)) + 1.0)).to(tl.float32)
    return libdevice.tanh(x)


@triton.jit
def _visible(m2, n2, Sk, win_lo, win_hi, WINDOW: tl.constexpr):
    """The visibility rule per element: whether query m2 sees key n2."""
    keep = n2 < Sk
    if WINDOW:
        keep = keep & (n2 >= m2 + win_lo) & (n2 <= m2 + win_hi)
    return keep


@triton.jit
def _key_range(start_m, Sk, win_lo, win_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """[lo, hi): the keys a query block [start_m, start_m + BLOCK_M) may see, lo on a key block
    boundary; the blocks outside are never loaded."""
    lo = 0
    hi = Sk
    if WINDOW:
        lo = tl.maximum(start_m + win_lo, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(Sk, start_m + BLOCK_M + win_hi)
    return lo, hi


@triton.jit
def _query_range(start_n, Sq, win_lo, win_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    """[lo, hi): the queries that may see a key of block [start_n, start_n + BLOCK_N), lo on a
    query block boundary."""
    lo = 0
    hi = Sq
    if WINDOW:
        lo = tl.maximum(start_n - win_hi, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(Sq, start_n + BLOCK_N - win_lo)
    return lo, hi


@triton.jit
def _scores(a, b, bias, offs_m, offs_n, Sk, sm_scale, softcap, win_lo, win_hi, alibi_slope, diagonal,
            MASK_KIND: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
            PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Masked scores cap(a @ b^T * scale) - alibi_slope * |i + diagonal - j| + bias of one tile:
    (a, b) = (q, k) gives (BLOCK_M, BLOCK_N); TRANSPOSED with (a, b) = (k, q) gives
    (BLOCK_N, BLOCK_M). Also returns the cap's slope d cap(s) / ds (1.0 without a cap) for the
    backward."""
    s = _dot(a, tl.trans(b), None, PRECISION) * sm_scale
    slope = 1.0
    if SOFTCAP:
        capped = _tanh(s / softcap, PRECISION)
        slope = 1.0 - capped * capped
        s = capped * softcap
    m2, n2 = _tile_index(offs_m, offs_n, TRANSPOSED)
    if ALIBI:
        s = s - alibi_slope * tl.abs(m2 + diagonal - n2).to(tl.float32)
    if MASK_KIND != 0:
        s = tl.where(bias == float("-inf"), float("-inf"), s + bias)
    return tl.where(_visible(m2, n2, Sk, win_lo, win_hi, WINDOW), s, float("-inf")), slope


@triton.jit
def _alibi_slope(AlibiSlopes, b, Hq, h, ALIBI: tl.constexpr):
    """ALiBi's slope of sequence b, query head h (AlibiSlopes: fp32 (B, Hq)); 0.0 without."""
    if ALIBI:
        slope = tl.load(AlibiSlopes + b * Hq + h)
    else:
        slope = 0.0
    return slope


@triton.jit
def _rng_state(RngState, DROPOUT: tl.constexpr):
    """(seed, offset) of a dropout call, read from the int64 rng_state tensor on the device (no
    host sync, so CUDA graphs can replay the call); zeros without dropout."""
    if DROPOUT:
        seed = tl.load(RngState)
        offset = tl.load(RngState + 1)
    else:  # one return: its types differ between the two cases
        seed, offset = 0, 0
    return seed, offset


@triton.jit
def _dropout_keep(seed, offset, bh, offs_m, start_n, drop_threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  TRANSPOSED: tl.constexpr):
    """Which scores of a tile dropout keeps, bit for bit csrc/philox.h's rule: score (i, j) of
    head bh = b * Hq + h is kept iff word j % 4 of Philox4x32-10(counter=(j // 4, i, bh, offset),
    key=(seed low, seed high)) is >= drop_threshold (tl.philox splits the seed into that key).
    Queries offs_m, keys [start_n, start_n + BLOCK_N) (start_n a multiple of 4): one Philox
    block decides four keys, so a tile costs BLOCK_M * BLOCK_N / 4 blocks. (BLOCK_M, BLOCK_N),
    or (BLOCK_N, BLOCK_M) when TRANSPOSED."""
    key4 = (start_n // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    rows = offs_m.to(tl.uint32)
    c0 = key4[None, :] + tl.zeros([BLOCK_M, BLOCK_N // 4], tl.uint32)
    c1 = rows[:, None] + tl.zeros([BLOCK_M, BLOCK_N // 4], tl.uint32)
    c2 = tl.zeros([BLOCK_M, BLOCK_N // 4], tl.uint32) + bh.to(tl.uint32)
    c3 = tl.zeros([BLOCK_M, BLOCK_N // 4], tl.uint32) + offset.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
    # Words are unsigned 32-bit and the threshold may be 2^32 (p = 1): compared as int64. The
    # decisions are interleaved as bytes (key 4 * a + w gets word w of block a), a quarter of
    # the data the words would move through the layout conversion.
    k0 = (w0.to(tl.int64) >= drop_threshold).to(tl.int8)
    k1 = (w1.to(tl.int64) >= drop_threshold).to(tl.int8)
    k2 = (w2.to(tl.int64) >= drop_threshold).to(tl.int8)
    k3 = (w3.to(tl.int64) >= drop_threshold).to(tl.int8)
    keep = tl.reshape(tl.join(tl.join(k0, k2), tl.join(k1, k3)), (BLOCK_M, BLOCK_N))
    if TRANSPOSED:
        keep = tl.trans(keep)
    return keep != 0


@triton.jit
def _dropped(x, keep, keep_scale):
    """x where dropout keeps the score, scaled by 1 / (1 - p); 0 where it drops it."""
    return tl.where(keep, x * keep_scale, 0.0)


@triton.jit
def _load_tile(base, row_offsets, row_ok, stride_col, N_COLS: tl.constexpr, COLS_PAD: tl.constexpr):
    """(len(row_offsets), COLS_PAD) tile whose row r starts at base + row_offsets[r]; rows not
    row_ok and the padding read 0."""
    cols = tl.arange(0, COLS_PAD)
    ptrs = base + row_offsets[:, None] + cols[None, :] * stride_col
    return tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < N_COLS), other=0.0)


@triton.jit
def _load_rows(base, offs_rows, n_rows, stride_row, stride_col, N_COLS: tl.constexpr, COLS_PAD: tl.constexpr):
    """(len(offs_rows), COLS_PAD) tile of a row-major matrix view; padding reads 0."""
    return _load_tile(base, offs_rows * stride_row, offs_rows < n_rows, stride_col, N_COLS, COLS_PAD)


@triton.jit
def _store_tile(base, row_offsets, row_ok, tile, N_COLS: tl.constexpr, COLS_PAD: tl.constexpr,
                PRECISION: tl.constexpr):
    """Stores the valid part of a padded tile, row r at base + row_offsets[r] (unit column
    stride) where row_ok."""
    cols = tl.arange(0, COLS_PAD)
    ptrs = base + row_offsets[:, None] + cols[None, :]
    tl.store(ptrs, _cast(tile, base.dtype.element_ty, PRECISION), mask=row_ok[:, None] & (cols[None, :] < N_COLS))


@triton.jit
def _store_rows(base, tile, offs_rows, n_rows, stride_row, N_COLS: tl.constexpr, COLS_PAD: tl.constexpr,
                PRECISION: tl.constexpr):
    """Stores the valid part of a padded tile into rows with a unit column stride."""
    _store_tile(base, offs_rows * stride_row, offs_rows < n_rows, tile, N_COLS, COLS_PAD, PRECISION)


@triton.jit
def _seq_info(CuSeqlensQ, CuSeqlensK, b, Sq, Sk, win_lo, win_hi, diagonal, VARLEN: tl.constexpr):
    """Sequence b of a call (flash-attention's BlockInfo): (first query row, queries, first
    key row, keys, window bounds, diagonal). Padded batches: rows from 0, Sq and Sk, the
    launcher's bounds. Packed (VARLEN): read from the int32 cumulative lengths, the launcher's
    bounds and diagonal (aligned at 0) moved to the sequence's own bottom-right diagonal."""
    if VARLEN:
        q_start = tl.load(CuSeqlensQ + b).to(tl.int64)
        q_len = tl.load(CuSeqlensQ + b + 1).to(tl.int64) - q_start
        k_start = tl.load(CuSeqlensK + b).to(tl.int64)
        k_len = tl.load(CuSeqlensK + b + 1).to(tl.int64) - k_start
        shift = k_len - q_len
        lo, hi, diag = win_lo + shift, win_hi + shift, diagonal + shift
    else:  # one return: its types differ between the two cases
        q_start, q_len, k_start, k_len, lo, hi, diag = 0, Sq, 0, Sk, win_lo, win_hi, diagonal
    return q_start, q_len, k_start, k_len, lo, hi, diag


@triton.jit
def _softmax_update(s, m_i, l_i):
    """One step of the online softmax over a tile of scores s (rows x keys): (p = exp(s - new
    max), alpha = the rescale of what the rows held, new max, new sum)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoids -inf - -inf while a row is empty
    p = _exp_shifted(s, m_safe[:, None])
    alpha = _exp_shifted(m_i, m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _finish_rows(acc, m_i, l_i, sink, SINKS: tl.constexpr):
    """(acc / sum, row max, row sum) at the end of an online softmax, with SINKS the sink (a
    logit per row with no value) joining the sum. Rows that saw nothing (sum 0): zeros, max -inf."""
    if SINKS:  # rescale to the new max
        m_new = tl.maximum(m_i, sink)
        alpha = _exp_shifted(m_i, m_new)  # 0 for a row that saw no key (m_i = -inf)
        l_i = l_i * alpha + _exp_shifted(sink, m_new)
        acc = acc * alpha[:, None]
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    return out, tl.where(empty, float("-inf"), m_i), l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Mask, Out, Lse, RowMax, RowSum, CuSeqlensQ, CuSeqlensK, RngState, Sinks, AlibiSlopes,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    rows_qb, rows_qh, rows_qm, stat_b, stat_h,
    Hq, Sq, Sk, group, sm_scale, softcap, win_lo, win_hi, diagonal, seq_bucket, drop_threshold, keep_scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, ROW_SHARED: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr, SINKS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(Sq, BLOCK_M), B * Hq), Sq the longest query sequence. Out is contiguous, row
    (b, h, i) at b * rows_qb + h * rows_qh + i * rows_qm (i counted from the sequence's first
    row); Lse, RowMax and RowSum (the softmax statistics) hold entry (b, h, i) at
    b * stat_b + h * stat_h + i. With DROPOUT, Out is the dropped attention; the statistics
    are the undropped softmax's. SINKS: Sinks (Hq,) fp32 holds a logit per head that joins
    each row's sum with no value; the statistics include it."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // group  # GQA: the kv head of this query head, read in place
    q_start, Sq, k_start, Sk, win_lo, win_hi, diagonal = _seq_info(CuSeqlensQ, CuSeqlensK, b, Sq, Sk, win_lo, win_hi,
                                                                  diagonal, VARLEN)
    if start_m >= Sq:  # a packed sequence shorter than the longest
        return
    seed, offset = _rng_state(RngState, DROPOUT)
    alibi_slope = _alibi_slope(AlibiSlopes, b, Hq, h, ALIBI)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * stride_qb + h * stride_qh + q_start * stride_qm, offs_m, Sq, stride_qm, stride_qd, D, D_PAD)
    k_base = K + b * stride_kb + hk * stride_kh + k_start * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + k_start * stride_vn
    mask_base = Mask + b * stride_mb + h * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    lo, hi = _key_range(start_m, Sk, win_lo, win_hi, BLOCK_M, BLOCK_N, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        bias = 0.0
        visible = True
        if MASK_KIND != 0:
            bias = _mask_bias(mask_base, offs_m, offs_n, Sq, Sk, stride_mm, stride_mn, MASK_KIND, ROW_SHARED, False)
            visible = _any_visible(bias)
        if visible:
            k = _load_rows(k_base, offs_n, Sk, stride_kn, stride_kd, D, D_PAD)
            s, _ = _scores(q, k, bias, offs_m, offs_n, Sk, sm_scale, softcap, win_lo, win_hi, alibi_slope, diagonal,
                           MASK_KIND, WINDOW, SOFTCAP, ALIBI, PRECISION, False)
            p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i)
            if DROPOUT:  # dropped after the row sum: the statistics are the undropped softmax's
                p = tl.where(_dropout_keep(seed, offset, bh, offs_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, False),
                             p, 0.0)
            v = _load_rows(v_base, offs_n, Sk, stride_vn, stride_vd, DV, DV_PAD)
            # P is rounded to V's dtype for the tensor cores, as PyTorch rounds its P: relative to
            # the running max it is at most 1, so the rounding error is relative to each entry
            # and no larger than torch's. (A hi + lo split of P would double the P @ V work.)
            acc = _dot(_cast(p, v.dtype, PRECISION), v, acc * alpha[:, None], PRECISION)

    sink = 0.0
    if SINKS:
        sink = tl.load(Sinks + h)
    out, row_max, l_i = _finish_rows(acc, m_i, l_i, sink, SINKS)
    if DROPOUT:
        out = out * keep_scale
    out_row = b * rows_qb + h * rows_qh + q_start * rows_qm
    _store_rows(Out + out_row * DV, out, offs_m, Sq, rows_qm * DV, DV, DV_PAD, PRECISION)
    in_range = offs_m < Sq
    stat = b * stat_b + h * stat_h + q_start + offs_m
    tl.store(Lse + stat, row_max + tl.log(l_i), mask=in_range)
    tl.store(RowMax + stat, row_max, mask=in_range)
    tl.store(RowSum + stat, l_i, mask=in_range)


@triton.jit
def _cache_slots(BlockTable, b, stride_tb, offs_n, key_ok, block_size, PAGED: tl.constexpr):
    """(page, slot) of keys offs_n of cache row b: key j lives at page * batch stride + slot *
    row stride. Paged: page = BlockTable[b, j // block_size], slot = j % block_size; contiguous:
    (b, j)."""
    if PAGED:
        page = tl.load(BlockTable + b * stride_tb + offs_n // block_size, mask=key_ok, other=0).to(tl.int64)
        slot = offs_n % block_size
    else:  # one return: its types differ between the two cases
        page, slot = b, offs_n
    return page, slot


@triton.jit
def _attn_fwd_kvcache_kernel(
    Q, KCache, VCache, CacheSeqlens, BlockTable, Out, Lse, Sinks, AlibiSlopes,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tb, Hq, Hkv, Sq, group, capacity, block_size, split_rows,
    sm_scale, softcap, win_lo, win_hi,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, GROUP_PAD: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SINKS: tl.constexpr, PAGED: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Attention of new queries against a KV cache, read in place. Grid (B * Hkv,
    cdiv(Sq, BLOCK_Q), splits): kv head hk of cache row b, queries [start_q, start_q + BLOCK_Q)
    of every query head of its GQA group, as one tile of BLOCK_Q * GROUP_PAD rows (row
    r: query start_q + r // GROUP_PAD, head hk * group + r % GROUP_PAD), so the group shares
    each K / V tile; split `split` of `splits` takes an equal share of the key blocks these
    queries see among the row's first CacheSeqlens[b] keys (int32, read here; clamped to
    [0, capacity]), so that splits divide each row's own length, not the room. K / V: contiguous
    (B, Hkv, capacity, D), or (PAGED) pages (num_blocks, Hkv, block_size, D) through the int32
    BlockTable (B, max_blocks). The window bounds arrive around diagonal 0 and move to the row's
    own bottom-right diagonal, as _seq_info does for packed sequences.
    Row (b, h, i) goes to split * split_rows + (b * Hq + h) * Sq + i of Out (DV contiguous) and
    Lse: with one split the output and lse, sinks folded in (SINKS); with several, each split's
    normalised output (fp32) and lse, which _kvcache_combine_kernel merges."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // Hkv
    hk = bh % Hkv
    start_q = tl.program_id(1) * BLOCK_Q
    split = tl.program_id(2)
    Sk = tl.minimum(tl.maximum(tl.load(CacheSeqlens + b), 0), capacity)  # a row never reads past its room
    diagonal = Sk - Sq
    win_lo += diagonal
    win_hi += diagonal
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    offs_m = start_q + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_ok = (offs_m < Sq) & (g < group)
    h = hk * group + tl.minimum(g, group - 1)  # padding rows repeat the group's last head, never stored
    q = _load_tile(Q + b * stride_qb, h * stride_qh + offs_m * stride_qm, row_ok, stride_qd, D, D_PAD)
    alibi_slope = _alibi_slope(AlibiSlopes, b, Hq, h[:, None], ALIBI)
    k_base = KCache + hk * stride_kh
    v_base = VCache + hk * stride_vh

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, DV_PAD], tl.float32)
    lo, hi = _key_range(start_q, Sk, win_lo, win_hi, BLOCK_Q, BLOCK_N, WINDOW)
    splits = tl.num_programs(2)
    blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    hi = tl.minimum(hi, lo + (split + 1) * blocks // splits * BLOCK_N)
    lo += split * blocks // splits * BLOCK_N  # stays on a key block boundary
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < Sk
        page, slot = _cache_slots(BlockTable, b, stride_tb, offs_n, key_ok, block_size, PAGED)
        k = _load_tile(k_base, page * stride_kb + slot * stride_kn, key_ok, stride_kd, D, D_PAD)
        s, _ = _scores(q, k, 0.0, offs_m, offs_n, Sk, sm_scale, softcap, win_lo, win_hi, alibi_slope, diagonal,
                       0, WINDOW, SOFTCAP, ALIBI, PRECISION, False)  # mask kind: none
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i)
        v = _load_tile(v_base, page * stride_vb + slot * stride_vn, key_ok, stride_vd, DV, DV_PAD)
        acc = _dot(_cast(p, v.dtype, PRECISION), v, acc * alpha[:, None], PRECISION)

    sink = 0.0
    if SINKS:
        sink = tl.load(Sinks + h)
    out, row_max, l_i = _finish_rows(acc, m_i, l_i, sink, SINKS)
    out_rows = split * split_rows + (b * Hq + h) * Sq + offs_m
    _store_tile(Out, out_rows * DV, row_ok, out, DV, DV_PAD, PRECISION)
    tl.store(Lse + out_rows, row_max + tl.log(l_i), mask=row_ok)


@triton.jit
def _kvcache_combine_kernel(
    PartOut, PartLse, Out, Lse, Sinks, n_rows, Hq, Sq, splits,
    DV: tl.constexpr, DV_PAD: tl.constexpr, SINKS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Out (contiguous, rows (b, h, i) numbered (b * Hq + h) * Sq + i) and Lse from the
    splits' normalised outputs (fp32, PartOut row split * n_rows + row) and lse: an online
    softmax over the splits' lse, in split order (deterministic), the sinks joining its sum.
    Grid (cdiv(n_rows, BLOCK_R),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, DV_PAD], tl.float32)
    for split in range(0, splits):
        part = split * n_rows + rows
        lse = tl.load(PartLse + part, mask=row_ok, other=float("-inf"))
        weight, alpha, m_i, l_i = _softmax_update(lse[:, None], m_i, l_i)
        acc = acc * alpha[:, None] + weight * _load_tile(PartOut, part * DV, row_ok, 1, DV, DV_PAD)
    sink = 0.0
    if SINKS:
        sink = tl.load(Sinks + (rows // Sq) % Hq, mask=row_ok, other=0.0)
    out, row_max, l_i = _finish_rows(acc, m_i, l_i, sink, SINKS)
    _store_tile(Out, rows * DV, row_ok, out, DV, DV_PAD, PRECISION)
    tl.store(Lse + rows, row_max + tl.log(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(
    Out, dO, Delta, CuSeqlensQ, CuSeqlensK,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stat_b, stat_h, Hq, Sq, Sk,
    DV: tl.constexpr, DV_PAD: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O), fp32, numbered like the softmax statistics (see the forward).
    Grid (cdiv(Sq, BLOCK_M), B * Hq)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    q_start, Sq, _, _, _, _, _ = _seq_info(CuSeqlensQ, CuSeqlensK, b, Sq, Sk, 0, 0, 0, VARLEN)
    o = _load_rows(Out + b * stride_ob + h * stride_oh + q_start * stride_om, offs_m, Sq, stride_om, stride_od, DV,
                   DV_PAD)
    do = _load_rows(dO + b * stride_gb + h * stride_gh + q_start * stride_gm, offs_m, Sq, stride_gm, stride_gd, DV,
                    DV_PAD)
    # float64: on nearly one-hot rows dP - delta cancels to almost nothing, so fp32 rounding
    # here would dominate dS; this kernel is memory-bound, O(Sq * DV).
    delta = tl.sum(o.to(tl.float64) * do.to(tl.float64), 1).to(tl.float32)
    tl.store(Delta + b * stat_b + h * stat_h + q_start + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _row_stats(RowMax, RowSum, Delta, row, offs_m, Sq):
    """Row max, 1 / row sum and delta of a query block, so that P = exp(s - max) / sum. Rows
    that saw no key (row sum 0) and rows past Sq get max +inf and 1 / sum 0: probability 0."""
    in_range = offs_m < Sq
    row_sum = tl.load(RowSum + row + offs_m, mask=in_range, other=0.0)
    empty = row_sum == 0.0
    row_max = tl.where(empty, float("inf"), tl.load(RowMax + row + offs_m, mask=in_range, other=0.0))
    inv_sum = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, row_sum))
    delta = tl.load(Delta + row + offs_m, mask=in_range, other=0.0)
    return row_max, inv_sum, delta


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, Mask, dO, RowMax, RowSum, Delta, dK, dV, dMask, CuSeqlensQ, CuSeqlensK, RngState, AlibiSlopes,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    rows_kb, rows_kh, rows_kn, stat_b, stat_h,
    Hq, Hkv, Sq, Sk, group, sm_scale, softcap, win_lo, win_hi, diagonal, seq_bucket, drop_threshold, keep_scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, ROW_SHARED: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, MASK_GRAD: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV (contiguous, row (b, hk, j) at b * rows_kb + hk * rows_kh + j * rows_kn, j
    counted from the sequence's first key) for one key block, and dMask (contiguous fp32
    (B, Hq, Sq, Sk), zero-filled by the caller; padded calls only) for the tiles it visits.
    Grid (cdiv(Sk, BLOCK_N), B * Hkv), Sk the longest key sequence. The query heads of a GQA
    group are summed inside the program, so every output element has one writer: no atomics,
    deterministic. With DROPOUT the keep decisions are regenerated: dV = (P*Z/(1-p))^T dO and
    dP = (dO V^T)*Z/(1-p), Z the keep mask."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hkv
    hk = bh % Hkv
    q_start, Sq, k_start, Sk, win_lo, win_hi, diagonal = _seq_info(CuSeqlensQ, CuSeqlensK, b, Sq, Sk, win_lo, win_hi,
                                                                  diagonal, VARLEN)
    if start_n >= Sk:  # a packed sequence shorter than the longest
        return
    seed, offset = _rng_state(RngState, DROPOUT)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K + b * stride_kb + hk * stride_kh + k_start * stride_kn, offs_n, Sk, stride_kn, stride_kd, D,
                   D_PAD)
    v = _load_rows(V + b * stride_vb + hk * stride_vh + k_start * stride_vn, offs_n, Sk, stride_vn, stride_vd, DV,
                   DV_PAD)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    lo, hi = _query_range(start_n, Sq, win_lo, win_hi, BLOCK_M, BLOCK_N, WINDOW)
    for g in range(0, group):
        h = hk * group + g
        alibi_slope = _alibi_slope(AlibiSlopes, b, Hq, h, ALIBI)
        stat = b * stat_b + h * stat_h + q_start
        q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_qm
        do_base = dO + b * stride_gb + h * stride_gh + q_start * stride_gm
        mask_base = Mask + b * stride_mb + h * stride_mh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            bias = 0.0
            visible = True
            if MASK_KIND != 0:
                bias = _mask_bias(mask_base, offs_m, offs_n, Sq, Sk, stride_mm, stride_mn, MASK_KIND, ROW_SHARED,
                                  True)
                visible = _any_visible(bias)
            if visible:
                q = _load_rows(q_base, offs_m, Sq, stride_qm, stride_qd, D, D_PAD)
                do = _load_rows(do_base, offs_m, Sq, stride_gm, stride_gd, DV, DV_PAD)
                # Transposed tiles (keys x queries): P^T and dS^T feed the dk / dv dots as
                # they are, with no register transposes.
                s_t, slope_t = _scores(k, q, bias, offs_m, offs_n, Sk, sm_scale, softcap, win_lo, win_hi, alibi_slope,
                                       diagonal, MASK_KIND, WINDOW, SOFTCAP, ALIBI, PRECISION, True)
                row_max, inv_sum, delta = _row_stats(RowMax, RowSum, Delta, stat, offs_m, Sq)
                p_t = _exp_shifted(s_t, row_max[None, :]) * inv_sum[None, :]
                p_used_t = p_t  # the probabilities that reached V
                if DROPOUT:
                    keep_t = _dropout_keep(seed, offset, b * Hq + h, offs_m, start_n, drop_threshold, BLOCK_M,
                                           BLOCK_N, True)
                    p_used_t = _dropped(p_t, keep_t, keep_scale)
                dv = _dot(_cast(p_used_t, do.dtype, PRECISION), do, dv, PRECISION)
                dp_t = _dot(v, tl.trans(do), None, PRECISION)
                if DROPOUT:
                    dp_t = _dropped(dp_t, keep_t, keep_scale)
                ds_t = p_t * (dp_t - delta[None, :])  # d loss / d (scale * q k^T + mask), transposed
                if MASK_GRAD:
                    ptrs = dMask + ((b * Hq + h) * Sq + offs_m[None, :]) * Sk + offs_n[:, None]
                    tl.store(ptrs, ds_t, mask=(offs_m[None, :] < Sq) & (offs_n[:, None] < Sk))
                ds_t = ds_t * slope_t  # the mask adds to the capped scores; q and k see the slope
                dk = _dot(_cast(ds_t, q.dtype, PRECISION), q, dk, PRECISION)
    key_row = b * rows_kb + hk * rows_kh + k_start * rows_kn
    _store_rows(dK + key_row * D, dk * sm_scale, offs_n, Sk, rows_kn * D, D, D_PAD, PRECISION)
    _store_rows(dV + key_row * DV, dv, offs_n, Sk, rows_kn * DV, DV, DV_PAD, PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, Mask, dO, RowMax, RowSum, Delta, dQ, CuSeqlensQ, CuSeqlensK, RngState, AlibiSlopes,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    rows_qb, rows_qh, rows_qm, stat_b, stat_h,
    Hq, Sq, Sk, group, sm_scale, softcap, win_lo, win_hi, diagonal, seq_bucket, drop_threshold, keep_scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, ROW_SHARED: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ (contiguous, rows numbered like the forward's Out) for one query block. Grid
    (cdiv(Sq, BLOCK_M), B * Hq), Sq the longest query sequence."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    q_start, Sq, k_start, Sk, win_lo, win_hi, diagonal = _seq_info(CuSeqlensQ, CuSeqlensK, b, Sq, Sk, win_lo, win_hi,
                                                                  diagonal, VARLEN)
    if start_m >= Sq:  # a packed sequence shorter than the longest
        return
    seed, offset = _rng_state(RngState, DROPOUT)
    alibi_slope = _alibi_slope(AlibiSlopes, b, Hq, h, ALIBI)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(Q + b * stride_qb + h * stride_qh + q_start * stride_qm, offs_m, Sq, stride_qm, stride_qd, D, D_PAD)
    do = _load_rows(dO + b * stride_gb + h * stride_gh + q_start * stride_gm, offs_m, Sq, stride_gm, stride_gd, DV,
                    DV_PAD)
    k_base = K + b * stride_kb + hk * stride_kh + k_start * stride_kn
    v_base = V + b * stride_vb + hk * stride_vh + k_start * stride_vn
    mask_base = Mask + b * stride_mb + h * stride_mh
    row_max, inv_sum, delta = _row_stats(RowMax, RowSum, Delta, b * stat_b + h * stat_h + q_start, offs_m, Sq)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    lo, hi = _key_range(start_m, Sk, win_lo, win_hi, BLOCK_M, BLOCK_N, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        bias = 0.0
        visible = True
        if MASK_KIND != 0:
            bias = _mask_bias(mask_base, offs_m, offs_n, Sq, Sk, stride_mm, stride_mn, MASK_KIND, ROW_SHARED, False)
            visible = _any_visible(bias)
        if visible:
            k = _load_rows(k_base, offs_n, Sk, stride_kn, stride_kd, D, D_PAD)
            v = _load_rows(v_base, offs_n, Sk, stride_vn, stride_vd, DV, DV_PAD)
            s, slope = _scores(q, k, bias, offs_m, offs_n, Sk, sm_scale, softcap, win_lo, win_hi, alibi_slope,
                               diagonal, MASK_KIND, WINDOW, SOFTCAP, ALIBI, PRECISION, False)
            p = _exp_shifted(s, row_max[:, None]) * inv_sum[:, None]
            dp = _dot(do, tl.trans(v), None, PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, offset, bh, offs_m, start_n, drop_threshold, BLOCK_M, BLOCK_N, False)
                dp = _dropped(dp, keep, keep_scale)
            ds = p * (dp - delta[:, None]) * slope
            dq = _dot(_cast(ds, k.dtype, PRECISION), k, dq, PRECISION)
    q_row = b * rows_qb + h * rows_qh + q_start * rows_qm
    _store_rows(dQ + q_row * D, dq * sm_scale, offs_m, Sq, rows_qm * D, D, D_PAD, PRECISION)


@triton.jit
def _softmax_logits(X, x_rows, Mask, m_rows, r, row_ok, cols, C, stride_xc, stride_mc, scale, win_lo, win_hi,
                    MASK_KIND: tl.constexpr, WINDOW: tl.constexpr):
    """scale * x + mask for a (BLOCK_R, BLOCK_C) chunk of rows; hidden entries are -inf."""
    ok = row_ok[:, None] & _visible(r[:, None], cols[None, :], C, win_lo, win_hi, WINDOW)
    z = tl.load(X + x_rows[:, None] + cols[None, :] * stride_xc, mask=ok, other=0.0).to(tl.float32) * scale
    m_ptrs = Mask + m_rows[:, None] + cols[None, :] * stride_mc
    if MASK_KIND == 1:
        ok = ok & (tl.load(m_ptrs, mask=ok, other=0) != 0)
    elif MASK_KIND == 2:
        bias = tl.load(m_ptrs, mask=ok, other=0.0).to(tl.float32)
        z = tl.where(bias == float("-inf"), float("-inf"), z + bias)  # hidden whatever the score
    return tl.where(ok, z, float("-inf"))


@triton.jit
def _row_offsets(rows, H, R, stride_b, stride_h, stride_r):
    """Element offsets of flat row indices (over B * H * R) in a 4-d strided tensor."""
    r = rows % R
    bh = rows // R
    return (bh // H) * stride_b + (bh % H) * stride_h + r * stride_r


@triton.jit
def _softmax_fwd_kernel(
    X, Mask, Y,
    stride_xb, stride_xh, stride_xr, stride_xc,
    stride_mb, stride_mh, stride_mr, stride_mc,
    H, R, C, n_rows, scale, win_lo, win_hi,
    MASK_KIND: tl.constexpr, WINDOW: tl.constexpr, ONE_PASS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Y (contiguous) = softmax(scale * X + mask) over the last dim, rows with nothing
    visible -> 0. ONE_PASS: the row fits in one BLOCK_C chunk and is read once; otherwise a
    first pass keeps an online max / sum over the chunks and a second one writes.
    Grid (cdiv(n_rows, BLOCK_R),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    r = rows % R
    x_rows = _row_offsets(rows, H, R, stride_xb, stride_xh, stride_xr)
    m_rows = _row_offsets(rows, H, R, stride_mb, stride_mh, stride_mr)
    y_ptrs = Y + rows[:, None] * C
    cols = tl.arange(0, BLOCK_C)
    if ONE_PASS:
        z = _softmax_logits(X, x_rows, Mask, m_rows, r, row_ok, cols, C, stride_xc, stride_mc, scale,
                            win_lo, win_hi, MASK_KIND, WINDOW)
        m = tl.max(z, 1)
        e = tl.exp(z - tl.where(m == float("-inf"), 0.0, m)[:, None])
        total = tl.sum(e, 1)
        y = e / tl.where(total == 0.0, 1.0, total)[:, None]
        tl.store(y_ptrs + cols[None, :], y.to(Y.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < C))
    else:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            z = _softmax_logits(X, x_rows, Mask, m_rows, r, row_ok, c0 + cols, C, stride_xc, stride_mc, scale,
                                win_lo, win_hi, MASK_KIND, WINDOW)
            m_new = tl.maximum(m, tl.max(z, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), 1)
            m = m_new
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        inv = 1.0 / tl.where(total == 0.0, 1.0, total)
        for c0 in range(0, C, BLOCK_C):
            z = _softmax_logits(X, x_rows, Mask, m_rows, r, row_ok, c0 + cols, C, stride_xc, stride_mc, scale,
                                win_lo, win_hi, MASK_KIND, WINDOW)
            y = tl.exp(z - m_safe[:, None]) * inv[:, None]
            tl.store(y_ptrs + c0 + cols[None, :], y.to(Y.dtype.element_ty),
                     mask=row_ok[:, None] & (c0 + cols[None, :] < C))


@triton.jit
def _softmax_bwd_kernel(
    dY, Y, dX,
    stride_gb, stride_gh, stride_gr, stride_gc,
    stride_yb, stride_yh, stride_yr, stride_yc,
    H, R, C, n_rows,
    ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dX (contiguous) = Y * (dY - rowsum(dY * Y)). Grid (cdiv(n_rows, BLOCK_R),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    g_ptrs = dY + _row_offsets(rows, H, R, stride_gb, stride_gh, stride_gr)[:, None]
    y_ptrs = Y + _row_offsets(rows, H, R, stride_yb, stride_yh, stride_yr)[:, None]
    dx_ptrs = dX + rows[:, None] * C
    cols = tl.arange(0, BLOCK_C)
    if ONE_PASS:
        ok = row_ok[:, None] & (cols[None, :] < C)
        g = tl.load(g_ptrs + cols[None, :] * stride_gc, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptrs + cols[None, :] * stride_yc, mask=ok, other=0.0).to(tl.float32)
        dot = tl.sum(g * y, 1)
        tl.store(dx_ptrs + cols[None, :], (y * (g - dot[:, None])).to(dX.dtype.element_ty), mask=ok)
    else:
        dot = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            ok = row_ok[:, None] & (c0 + cols[None, :] < C)
            g = tl.load(g_ptrs + (c0 + cols[None, :]) * stride_gc, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptrs + (c0 + cols[None, :]) * stride_yc, mask=ok, other=0.0).to(tl.float32)
            dot += tl.sum(g * y, 1)
        for c0 in range(0, C, BLOCK_C):
            ok = row_ok[:, None] & (c0 + cols[None, :] < C)
            g = tl.load(g_ptrs + (c0 + cols[None, :]) * stride_gc, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptrs + (c0 + cols[None, :]) * stride_yc, mask=ok, other=0.0).to(tl.float32)
            tl.store(dx_ptrs + c0 + cols[None, :], (y * (g - dot[:, None])).to(dX.dtype.element_ty), mask=ok)
