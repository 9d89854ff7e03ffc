"""Ragged paged attention for prefill-shaped batches as a Mosaic GPU kernel (Hopper: wgmma, TMA, warp specialisation).

One CTA = one work item (`2 * block_t` consecutive new tokens of one sequence) x one kv head. Three
warpgroups: two compute warpgroups (one `block_t`-token tile each, FA3 ping-pong on a schedule barrier)
and one memory warpgroup that streams K/V blocks of `block_kv` tokens through `num_stages` SMEM slots,
one TMA per page with the page number from the page table as a TMA coordinate.

GQA: a compute tile holds the `group` q heads of one kv head stacked along the wgmma M dimension,
row `r = g * block_t + t` (head-major inside the tile, so that every head is one 2D TMA box of q).
64 rows = `group_p * block_t`, where `group_p` is the group padded to a power of two (<= 8).

Ragged q: a TMA into a tiled SMEM buffer needs a GMEM row offset that is a multiple of 8
(ROW_ALIGN, the TilingTransform constraint), so each sequence's tiles start at its first token rounded down to 8.
Rows outside the sequence are computed and never stored: a full tile goes out through the (by then
free) tiled q tile, a partial one through an untiled SMEM tile as TMA boxes of power-of-two row counts
that cover exactly the sequence's rows. Padding tokens (from `cu_q_lens[num_seqs]` to T) get work items
that only store zeros.

Sliding window: each tile also has a first kv block (the one its first row's window reaches); blocks
wholly outside the window of all of a tile's rows are skipped, blocks cut by the window's lower edge
take the masked body like the causal diagonal, and the memory warpgroup streams the union of the two
tiles' ranges, replacing pages wholly before the window of the CTA's first row by the out-of-bounds page
(never read: the block manager may have freed them). Soft-cap: `cap * tanh(s / cap)` on the natural
logits before masking, then base 2. Without a window / soft-cap the program is the one without them.

Stale or poisoned slots: table entries past a sequence's last page become the out-of-bounds page
`num_pages`, which TMA fills with zeros; the slots after `kv_len` in the last (partial) page are masked
in the scores and zeroed in the V tile before P.V (0 * NaN = NaN otherwise).

Supported: bf16/f16, head_dim 64 or 128, page_size 8..block_kv (power of two), q heads per kv head
<= 8, causal attention with an optional sliding window and logit soft-cap, SMEM within 227 KB. `unsupported_reason`
says why an input is not (the caller then uses the Triton kernel). Checked on CPU by lowering for CUDA
and in Mosaic GPU's interpreter; on the GPU by `bench/kernels_mgpu.py` (status: pallas_kernels/README.md).
Semantics, layout and the oracle: `ragged_paged_attention.py`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import (LOG2E, MASK_VALUE, ROWS, ROW_ALIGN, SMEM_BYTES, accumulate_pv,
                                        check_lowering, compiler_params, interpret_params, next_pow2,
                                        softmax_state, tiled_smem, wgmma_iota, zero_stale_v)
from pallas_kernels.ragged_paged_attention import (mosaic_inputs_reason, mosaic_page_format_reason, options_reason,
                                                   static_validate_inputs)

NUM_COMPUTE_WGS = 2
MAX_GROUP = ROWS // ROW_ALIGN


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Static launch shape: kv tokens per pipeline step, SMEM slots for K/V, Mosaic lowering semantics."""

    block_kv: int = 128
    num_stages: int = 2
    lowering: str | None = "lane"   # "lane" or "warpgroup" (rejected by layout inference); None = jax default

    def __post_init__(self):
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"block_kv must be 64, 128, 192 or 256, got {self.block_kv}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")
        check_lowering(self.lowering)


# --- shapes ------------------------------------------------------------------------------------------


def tile_shape(num_q_heads: int, num_kv_heads: int) -> tuple[int, int, int]:
    """(group, group_p, block_t): q heads per kv head, padded to a power of two, tokens per 64-row tile."""
    group = num_q_heads // num_kv_heads
    group_p = next_pow2(group)
    return group, group_p, ROWS // group_p


def page_format_reason(*, head_dim: int, page_size: int, dtype, config: MosaicConfig | None = None) -> str | None:
    """Why this kernel cannot read pages of this format (None when it can)."""
    return mosaic_page_format_reason(head_dim=head_dim, page_size=page_size, dtype=dtype,
                                     block_kv=(config or MosaicConfig()).block_kv)


def unsupported_reason(q, k_pages, *, sliding_window=None, soft_cap=None,
                       config: MosaicConfig | None = None) -> str | None:
    """Why this kernel cannot take these inputs (None when it can); shapes and dtypes only, no tracing."""
    config = config or MosaicConfig()
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    if (reason := options_reason(sliding_window, soft_cap)) is not None:
        return reason
    if (reason := mosaic_inputs_reason(q, k_pages, block_kv=config.block_kv)) is not None:
        return reason
    if num_q_heads % num_kv_heads or num_q_heads // num_kv_heads > MAX_GROUP:
        return f"q heads per kv head must be <= {MAX_GROUP}, got {num_q_heads}/{num_kv_heads}"
    if (smem := smem_bytes(head_dim, jnp.dtype(q.dtype).itemsize, config)) > SMEM_BYTES:
        return f"{config} needs {smem} bytes of SMEM at head_dim {head_dim}, more than {SMEM_BYTES}"
    return None


def smem_bytes(head_dim: int, itemsize: int, config: MosaicConfig) -> int:
    """SMEM of one CTA: q and o tiles per compute warpgroup, K and V slots, barriers, reduction scratch."""
    tiles = 2 * NUM_COMPUTE_WGS * ROWS + 2 * config.num_stages * config.block_kv
    return tiles * head_dim * itemsize + 8 * (2 + 4 * config.num_stages + 1) + 2048


# --- work list ---------------------------------------------------------------------------------------

def max_work_items(num_tokens: int, num_slots: int, tokens_per_item: int) -> int:
    """Static bound on the items of `work_items`. A non-empty interval (a sequence or the padding) of L
    rows starting r < ROW_ALIGN rows past an 8-row boundary takes ceil((L + r) / tokens_per_item) <=
    (L + ROW_ALIGN - 1 + tokens_per_item - 1) / tokens_per_item items, and at most min(S + 1, T) intervals
    are non-empty. Every item past the live ones is still a CTA per kv head (pallas_kernels/README.md,
    "Dead work items"), so the bound is kept tight: 369 items at 2,048 tokens and 256 slots (the
    looser `cdiv(T, tpi) + 2 (S + 1)` gave 578)."""
    intervals = min(num_slots + 1, num_tokens)
    return (num_tokens + intervals * (tokens_per_item + ROW_ALIGN - 2)) // tokens_per_item


def work_items(cu_q_lens: jax.Array, num_seqs: jax.Array, kv_lens: jax.Array, num_tokens: int,
               tokens_per_item: int, sliding_window: int | None = None,
               exclude: jax.Array | None = None, max_seqs: int | None = None) -> jax.Array:
    """items[W, 5] int32 = (seq, first token, seq start a, seq end b, kv_len), heaviest first.

    Each interval [a, b) of q rows (each real sequence, then the padding [cu_q_lens[num_seqs], T) with
    seq = -1) is covered by items starting at a rounded down to ROW_ALIGN, `tokens_per_item` apart.
    Items past the last one are (-1, 0, 0, 0, 0): they store nothing. kv_len rides along so that a
    CTA's first page-table load does not wait for a second dependent load. With a window, an item's
    cost (its kv range) is capped at the window plus its tokens. Sequences marked in `exclude` [S] get
    no items: their rows are left for another kernel (mixed_batch.attend_mixed). `max_seqs`, when given,
    is the caller's static bound on the sequences that get items (real, not excluded, at least one new
    token): the list is then sized for that many intervals instead of S + 1 (at 2,048 tokens and 512
    slots, 84 items for 16 sequences instead of 673). Items past the bound would be dropped, so the
    bound must hold; the engine's scheduler guarantees it (EngineConfig.max_num_prefill_seqs).
    """
    num_slots = cu_q_lens.shape[0] - 1
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    included = slot < num_seqs if exclude is None else (slot < num_seqs) & ~exclude
    q_lens = jnp.where(included, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    real_end = jnp.minimum(cu_q_lens[jnp.minimum(num_seqs, num_slots)], num_tokens)
    a = jnp.concatenate([cu_q_lens[:-1], real_end[None]])                       # [S + 1]
    b = jnp.concatenate([cu_q_lens[:-1] + q_lens, jnp.full((1,), num_tokens, jnp.int32)])
    seq_of = jnp.concatenate([slot, jnp.full((1,), -1, jnp.int32)])
    base = a // ROW_ALIGN * ROW_ALIGN
    count = jnp.where(b > a, (b - base + tokens_per_item - 1) // tokens_per_item, 0)
    ends = jnp.cumsum(count)

    bound = num_slots if max_seqs is None else min(num_slots, max_seqs)
    item = jnp.arange(max_work_items(num_tokens, bound, tokens_per_item), dtype=jnp.int32)
    # compare_all: one fused op; the default binary search is a device loop.
    interval = jnp.searchsorted(ends, item, side="right", method="compare_all").astype(jnp.int32)
    interval = jnp.minimum(interval, num_slots)
    live = item < ends[-1]
    start = base[interval] + (item - (ends[interval] - count[interval])) * tokens_per_item
    seq = jnp.where(live, seq_of[interval], -1)
    kv_len = jnp.where(seq >= 0, kv_lens[jnp.maximum(seq, 0)], 0)
    items = jnp.stack([seq, jnp.where(live, start, 0), jnp.where(live, a[interval], 0),
                       jnp.where(live, b[interval], 0), kv_len], axis=1).astype(jnp.int32)
    # Longest kv range first, so that the causal triangle's heavy tiles do not finish last.
    q_len = items[:, 3] - items[:, 2]
    last_pos = kv_len - q_len + jnp.minimum(items[:, 3], start + tokens_per_item) - items[:, 2]
    if sliding_window is not None:
        last_pos = jnp.minimum(last_pos, sliding_window + tokens_per_item)
    cost = jnp.where(seq >= 0, last_pos, -1)
    return items[jnp.argsort(-cost, stable=True)]


# --- kernel ------------------------------------------------------------------------------------------

def _kernel(
    # inputs
    items_ref,       # [W, 5] int32 (seq, first token, a, b, kv_len)
    page_table_ref,  # [S, P] int32
    q_ref,           # [T8, Hq, D]  (T rounded up to a multiple of 8)
    k_pages_ref,     # [N, page_size, Hkv, D]
    v_pages_ref,     # [N, page_size, Hkv, D]
    # outputs
    o_ref,           # [T8, Hq, D]
    # scratch
    q_smem,          # [2, 64, D] tiled + swizzled, one q tile per compute warpgroup, then its full output tile
    k_smem,          # [stages, block_kv, D] tiled + swizzled
    v_smem,          # [stages, block_kv, D] tiled + swizzled
    o_smem,          # [2, 64, D] untiled: partial output tiles
    q_bar,           # [2] TMA barriers, `group` arrivals each
    k_bar, v_bar,    # [stages] TMA barriers, `pages_per_block` arrivals each
    k_free, v_free,  # [stages] consumed barriers, one arrival per compute warpgroup
    schedule,        # ping-pong barrier of the two compute warpgroups
    *, sm_scale: float, group: int, block_t: int, block_kv: int, num_stages: int, oob_page: int,
    interpret: bool, sliding_window: int | None = None, soft_cap: float | None = None,
):
    h = lax.axis_index("h")
    wg = lax.axis_index("wg")
    item = lax.axis_index("w")
    page_size = k_pages_ref.shape[1]
    pages_per_seq = page_table_ref.shape[1]
    pages_per_block = block_kv // page_size
    dtype = q_ref.dtype

    seq = items_ref[item, 0]
    start = items_ref[item, 1]
    seq_a = items_ref[item, 2]
    seq_b = items_ref[item, 3]
    has_kv = seq >= 0
    s = jnp.maximum(seq, 0)
    kv_len = items_ref[item, 4]
    pos_off = kv_len - (seq_b - seq_a) - seq_a        # position of token t is t + pos_off

    def tile_range(w):
        """(t0, lo, hi, n_blocks, n_full) of compute warpgroup w: its rows' tokens and kv blocks."""
        t0 = start + w * block_t
        lo, hi = jnp.maximum(seq_a, t0), jnp.minimum(seq_b, t0 + block_t)
        active = has_kv & (hi > lo)
        n_blocks = jnp.where(active, (hi + pos_off + block_kv - 1) // block_kv, 0)
        n_full = jnp.where(active, (lo + pos_off + 1) // block_kv, 0)
        return t0, lo, hi, n_blocks, n_full

    n_cta = jnp.maximum(tile_range(0)[3], tile_range(1)[3])
    windowed = sliding_window is not None
    if windowed:
        # A window gives each tile a first kv block too: blocks before it are wholly outside the window of
        # all its rows. The CTA streams the union [cta_lo, n_cta) of its tiles' ranges (contiguous: the
        # tiles are adjacent tokens of one sequence); an idle tile's range is empty at cta_lo.
        def window_range(w):
            """(b_lo, b_full): first block that the tile's first row sees, first block that its last row
            sees whole (all later blocks before n_full are inside every row's window)."""
            _, lo, hi, _, _ = tile_range(w)
            b_lo = jnp.maximum(lo + pos_off - sliding_window + 1, 0) // block_kv
            b_full = (jnp.maximum(hi + pos_off - sliding_window, 0) + block_kv - 1) // block_kv
            return b_lo, b_full

        cta_lo = n_cta
        for w in range(NUM_COMPUTE_WGS):
            cta_lo = jnp.minimum(cta_lo, jnp.where(tile_range(w)[3] > 0, window_range(w)[0], n_cta))

    schedule = schedule.at[0]

    def schedule_barrier():
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < NUM_COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        t0, lo, hi, n_blocks, n_full = tile_range(wg)
        head_dim = q_ref.shape[2]

        @pl.when(n_blocks > 0)
        def _load_q():
            for g in range(group):
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(t0, block_t), h * group + g],
                                        q_smem.at[wg, pl.ds(g * block_t, block_t)], q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            if not windowed:  # with a window, after the leading skipped blocks (below)
                plgpu.barrier_wait(k_bar.at[0])

        if windowed:
            active = n_blocks > 0
            b_lo, b_full = window_range(wg)
            b_lo = jnp.where(active, b_lo, cta_lo)
            b_full = jnp.where(active, b_full, cta_lo)
            n_blocks = jnp.where(active, n_blocks, cta_lo)   # the tile's blocks: [b_lo, n_blocks)

        def kv_step(block, carry, *, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(block, num_stages)

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].T)
                schedule_barrier()
                return acc_ref[...]

            if interpret:  # jax 0.10's interpreter has no wgmma with a transposed operand
                schedule_barrier()
                scores = lax.dot_general(q_smem[wg], k_smem[slot], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
            else:
                scores = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if soft_cap is None:
                scores = scores * (sm_scale * LOG2E)                    # base-2 logits
            else:  # cap * tanh(s / cap) on the natural logits s = sm_scale * q.k, then base 2
                scores = jnp.tanh(scores * (sm_scale / soft_cap)) * (soft_cap * LOG2E)
            if masked:
                # kv position <= row position, i.e. col + block * block_kv <= t0 + (row % block_t) + pos_off.
                shift = block * block_kv - t0 - pos_off
                kv_col = wgmma_iota(scores.shape, 1, interpret) + shift
                row_t = wgmma_iota(scores.shape, 0, interpret) & (block_t - 1)
                mask = kv_col <= row_t
                if windowed:  # and row position - kv position < window
                    mask = mask & (kv_col > row_t - sliding_window)
                scores = jnp.where(mask, scores, MASK_VALUE)
            m_next = jnp.maximum(m_i, scores.max(axis=1))
            alpha = jnp.exp2(m_i - m_next)
            p = jnp.exp2(scores - lax.broadcast_in_dim(m_next, scores.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_i, m_next, p16 = lax.optimization_barrier((acc, l_i, m_next, p16))

            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(v_bar.at[slot])
            if masked:
                has_stale = (block == (kv_len - 1) // block_kv) & (kv_len % page_size != 0)
                pl.when(has_stale)(functools.partial(zero_stale_v, v_smem, slot, block, kv_len,
                                                     block_kv=block_kv, interpret=interpret))
            plgpu.barrier_wait(schedule)

            def wait_next_k():
                @pl.when(block + 1 < n_blocks)
                def _():
                    plgpu.barrier_wait(k_bar.at[lax.rem(block + 1, num_stages)])

            acc = accumulate_pv(acc, p16, v_smem, slot, v_free, wait_next_k, interpret=interpret)
            return acc, m_next, l_i

        def skip_step(block, _):
            """Blocks only the other warpgroup needs: release the slots, keep the ping-pong in step.

            Waiting for the data first costs nothing (the other warpgroup needs it) and keeps every
            barrier phase observed by every waiter, which the interpreter checks.
            """
            slot = lax.rem(block, num_stages)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            schedule_barrier()
            schedule_barrier()

        acc, m_i, l_i = softmax_state(head_dim, interpret)
        carry = (acc, m_i, l_i)

        def masked_steps(lo_block, hi_block, c):
            return lax.cond(lo_block < hi_block,
                            lambda c: lax.fori_loop(lo_block, hi_block, functools.partial(kv_step, masked=True), c),
                            lambda c: c, c)

        pl.when(wg == 1)(schedule_barrier)
        if not windowed:
            carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), carry)
            carry = masked_steps(n_full, n_blocks, carry)
        else:
            # [cta_lo, b_lo): the other tile's; [b_lo, b_full): the window's lower edge, masked;
            # [b_full, n_full): inside every row's window and causal range; then the diagonal, masked.
            lax.fori_loop(cta_lo, b_lo, skip_step, None)
            pl.when(b_lo < n_blocks)(lambda: plgpu.barrier_wait(k_bar.at[lax.rem(b_lo, num_stages)]))
            carry = masked_steps(b_lo, jnp.minimum(b_full, n_blocks), carry)
            carry = lax.fori_loop(b_full, n_full, functools.partial(kv_step, masked=False), carry)
            carry = masked_steps(jnp.maximum(b_full, n_full), n_blocks, carry)
        lax.fori_loop(n_blocks, n_cta, skip_step, None)
        pl.when(wg == 0)(schedule_barrier)
        acc, _, l_i = carry

        # Rows that saw no kv (zero-fill items, rows outside the sequence) have acc == 0 and l == 0.
        inv_l = 1.0 / jnp.maximum(l_i, 1e-30)
        out = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(o_ref.dtype)
        n_rows = jnp.maximum(hi - lo, 0)

        @pl.when(n_rows == block_t)
        def _store_full_tile():  # through the q tile (free after the last QK): swizzled, 8-row aligned
            q_smem[wg] = out
            plgpu.commit_smem()
            for g in range(group):
                plgpu.copy_smem_to_gmem(q_smem.at[wg, pl.ds(g * block_t, block_t)],
                                        o_ref.at[pl.ds(t0, block_t), h * group + g])

        @pl.when((n_rows > 0) & (n_rows < block_t))
        def _store_partial_tile():
            o_smem[wg] = out
            plgpu.commit_smem()
            _store_rows(o_smem.at[wg], o_ref, h, t0, lo, n_rows, group=group, block_t=block_t)

        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == NUM_COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        pages_in_seq = (kv_len + page_size - 1) // page_size
        if windowed:  # pages wholly before the window of the CTA's first row are never read (freed pages)
            first_page = jnp.maximum(jnp.maximum(seq_a, start) + pos_off - sliding_window + 1, 0) // page_size

        def block_pages(block):
            """Physical pages of kv block `block`; past the sequence (or before the window), the
            out-of-bounds page (zeros)."""
            pages = []
            for j in range(pages_per_block):
                idx = block * pages_per_block + j
                page = page_table_ref[s, jnp.minimum(idx, pages_per_seq - 1)]
                live = idx < pages_in_seq
                if windowed:
                    live = live & (idx >= first_page)
                pages.append(jnp.where(live, page, oob_page))
            return pages

        def copy_block(pages_ref, smem, bar, pages, slot):
            for j, page in enumerate(pages):
                plgpu.copy_gmem_to_smem(pages_ref.at[page, :, h, :],
                                        smem.at[slot, pl.ds(j * page_size, page_size)], bar.at[slot])

        first_block = cta_lo if windowed else 0

        @pl.loop(first_block, n_cta)
        def _stream(block):
            slot = lax.rem(block, num_stages)
            reuse = (block - cta_lo >= num_stages) if windowed else block >= num_stages
            pages = block_pages(block)      # page-table loads overlap the wait for a free slot
            pl.when(reuse)(lambda: plgpu.barrier_wait(k_free.at[slot]))
            copy_block(k_pages_ref, k_smem, k_bar, pages, slot)
            pl.when(reuse)(lambda: plgpu.barrier_wait(v_free.at[slot]))
            copy_block(v_pages_ref, v_smem, v_bar, pages, slot)

        @pl.loop(jnp.maximum(n_cta - num_stages, first_block), n_cta)
        def _drain(block):  # observe the last releases too (cheap; the interpreter checks every phase)
            slot = lax.rem(block, num_stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def _store_rows(o_tile, o_ref, h, t0, lo, n_rows, *, group: int, block_t: int):
    """TMA-store the n_rows (< block_t) tile rows of tokens [lo, lo + n_rows) for each head of the group.

    The first row's offset in GMEM is arbitrary, so the tile is untiled SMEM and the rows go out as
    power-of-two boxes (largest first): no row of a neighbouring sequence is ever touched.
    """
    for g in range(group):
        def store(offset, size, g=g):
            plgpu.copy_smem_to_gmem(o_tile.at[pl.ds(g * block_t + offset, size)],
                                    o_ref.at[pl.ds(t0 + offset, size), h * group + g])

        offset = lo - t0
        size = block_t // 2
        while size >= 1:
            pl.when((n_rows & size) != 0)(functools.partial(store, offset, size))
            offset = offset + (n_rows & size)
            size //= 2


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "config", "interpret",
                                             "max_seqs"))
def ragged_paged_attention_mgpu(
    q: jax.Array,           # [T, Hq, D]
    k_pages: jax.Array,     # [N, page_size, Hkv, D]
    v_pages: jax.Array,     # [N, page_size, Hkv, D]
    kv_lens: jax.Array,     # [S] int32
    page_table: jax.Array,  # [S, P] int32
    cu_q_lens: jax.Array,   # [S + 1] int32
    num_seqs: jax.Array,    # [] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    config: MosaicConfig | None = None,
    interpret: bool = False,
    exclude: jax.Array | None = None,
    max_seqs: int | None = None,
) -> jax.Array:
    """Ragged paged attention (semantics in `ragged_paged_attention.py`) as a Mosaic GPU kernel.

    Args:
      q: [T, Hq, D] new tokens of all sequences, flattened; rows past cu_q_lens[num_seqs] are padding.
      k_pages, v_pages: [N, page_size, Hkv, D] page pools.
      kv_lens: [S] context length of each sequence after this step (new tokens included).
      page_table: [S, P] physical page of each logical page.
      cu_q_lens: [S + 1] boundaries of each sequence's tokens in q.
      num_seqs: [] number of real sequences.
      sm_scale: softmax scale.
      sliding_window: None, or W >= 1: the token at position p sees kv positions j with p - W < j <= p.
      soft_cap: None, or cap > 0: logits s = sm_scale * q.k become cap * tanh(s / cap) before masking.
      config: launch shape; None = `MosaicConfig()`.
      interpret: run in Mosaic GPU's interpreter (CPU). jax 0.10's interpreter lacks a few primitives:
        the two matmuls are then `lax.dot_general` on the same SMEM tiles instead of wgmma, layout
        casts are dropped, and q / the pool get the zero padding that TMA's out-of-bounds fill gives
        on the device. Everything else (work list, page-table TMAs, barriers, masks, stores) is the
        kernel that runs on the GPU.
      exclude: None, or [S] bool: sequences the kernel skips; their rows of o are left undefined
        (mixed_batch.attend_mixed fills them from the decode kernel).
      max_seqs: None, or a static bound on the sequences the kernel computes (real, not excluded, with
        new tokens), which shortens the work list (`work_items`); the caller guarantees it.

    Returns:
      o: [T, Hq, D] in q's dtype; padding rows are zeros.
    """
    static_validate_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    config = config or MosaicConfig()
    reason = unsupported_reason(q, k_pages, sliding_window=sliding_window, soft_cap=soft_cap, config=config)
    if reason is not None:
        raise NotImplementedError(reason)
    num_tokens, num_q_heads, _ = q.shape
    _, _, block_t = tile_shape(num_q_heads, k_pages.shape[2])
    tokens_per_item = NUM_COMPUTE_WGS * block_t
    items = work_items(cu_q_lens, jnp.reshape(num_seqs, ()), kv_lens, num_tokens, tokens_per_item,
                       sliding_window, exclude, max_seqs)
    return launch(items, page_table, q, k_pages, v_pages, sm_scale=sm_scale, config=config, interpret=interpret,
                  sliding_window=sliding_window, soft_cap=soft_cap)


def launch(items, page_table, q, k_pages, v_pages, *, sm_scale: float, config: MosaicConfig,
           interpret: bool = False, sliding_window: int | None = None,
           soft_cap: float | None = None) -> jax.Array:
    """The kernel over a work list from `work_items` (inputs already validated): o [T, Hq, D]."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group, _, block_t = tile_shape(num_q_heads, num_kv_heads)
    tokens_per_item = NUM_COMPUTE_WGS * block_t
    stages, block_kv = config.num_stages, config.block_kv
    scratch = (
        tiled_smem((NUM_COMPUTE_WGS, ROWS, head_dim), q.dtype),
        tiled_smem((stages, block_kv, head_dim), k_pages.dtype),
        tiled_smem((stages, block_kv, head_dim), v_pages.dtype),
        plgpu.SMEM((NUM_COMPUTE_WGS, ROWS, head_dim), q.dtype),
        plgpu.Barrier(num_arrivals=group, num_barriers=NUM_COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=stages),
        plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=stages),
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS, num_barriers=1),   # .at[0] below
    )
    oob_page = k_pages.shape[0]       # one past the pool: TMA fills the box with zeros
    padded_tokens = pl.cdiv(num_tokens, ROW_ALIGN) * ROW_ALIGN
    if padded_tokens != num_tokens:   # tiled TMA views of q and o need whole 8-row tiles (copies; rare)
        q = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    if interpret:
        # The interpreter raises on out-of-bounds TMA boxes where the hardware fills zeros: give the
        # tiles past T and the page `num_pages` real (zero) memory.
        q = jnp.pad(q, ((0, tokens_per_item), (0, 0), (0, 0)))
        k_pages = jnp.pad(k_pages, ((0, 1), (0, 0), (0, 0), (0, 0)))
        v_pages = jnp.pad(v_pages, ((0, 1), (0, 0), (0, 0), (0, 0)))
    kernel = functools.partial(_kernel, sm_scale=sm_scale, group=group, block_t=block_t,
                               block_kv=block_kv, num_stages=stages, oob_page=oob_page,
                               interpret=interpret, sliding_window=sliding_window, soft_cap=soft_cap)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((padded_tokens, num_q_heads, head_dim), q.dtype),
        scratch_types=scratch,
        grid=(num_kv_heads, items.shape[0]),
        grid_names=("h", "w"),
        num_threads=NUM_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=compiler_params(config.lowering),
        interpret=interpret_params() if interpret else None,
    )(items, page_table, q, k_pages, v_pages)
    return out if padded_tokens == num_tokens else out[:num_tokens]
