"""Paged-attention decode (flash-decoding) as a Mosaic GPU kernel (Hopper: TMA + wgmma, warp specialisation).

Routed when `Backend.decode == "mosaic"` (pallas_kernels/backend.py); its measurements against the
Triton decode kernel are in pallas_kernels/README.md.

One CTA = one token x one kv head x one kv split (grid `(T, Hkv, K)`), two warpgroups:
- the memory warpgroup streams the split's kv blocks (`block_kv` tokens = `block_kv / page_size` pages)
  through `num_stages` SMEM slots, one TMA per page with the page number read from the page table as
  the TMA coordinate (`[N, page, Hkv, D]` unchanged: one kv head's `page` rows, strided by Hkv * D);
- the compute warpgroup runs QK^T and P.V as wgmma with M = 64: the token's `group` q heads sit in the
  first rows of a 64-row q tile (the rest is never stored; rows are independent, so whatever the rows
  hold cannot leak). Decode is memory-bound, so the padded MMA rows cost nothing that matters, and the
  wgmma + WGMMA-layout softmax is exactly what the prefill kernel (`ragged_paged_attention_mgpu.py`)
  already lowers in jax 0.10.2 and 0.11.2.

q without a copy: q is viewed as `[T * Hq, D]` (a bitcast). A TMA into the (8, 64)-tiled q tile needs a
GMEM row offset that is a multiple of 8 (ROW_ALIGN), so the CTA loads the `qrows`
(8 or 16) rows from `(t * Hq + h * group)` rounded down to 8; its heads are rows `r0 .. r0 + group` of the
tile (neighbouring heads fill the rest, computed and thrown away).

Output: one split: the normalised rows go out through an untiled SMEM tile as one TMA box of `group`
rows straight into `o[T, Hq, D]` (every row of o is written by exactly one CTA; padding tokens have an
empty kv range and store zeros). K > 1 splits: each CTA stores its `qrows` rows (f32, normalised) and
their log-sum-exp (base 2), and one XLA fusion merges the splits (`_merge_splits`).

Sequence lookup: a jnp pre-pass (`ragged_paged_attention.token_info`, one small fusion, loop-invariant across layers in a model
step) gives each token its slot and kv range end (`pos + 1`; 0 for padding tokens). Any q_len mix with
T <= S is exact (0/1 in the engine's decode steps, short chunks too).

Stale or poisoned slots: pages at or past `cdiv(kv_hi, page_size)` are fetched as the out-of-bounds
page `N` (TMA zero fill on the device: garbage table entries are never dereferenced); the slots after
`kv_hi` in the last (partial) page are masked in the scores and zeroed in the V tile in SMEM before P.V
(0 * NaN = NaN otherwise).

Supported: bf16/f16; head_dim 64/128; page_size a power of two in [8, block_kv]; q heads per kv head with
`qrows <= 64` (any GQA/MHA/MQA ratio up to 56, padded); T <= S (decode-shaped); no sliding window and
no soft-cap yet (NotImplementedError, `unsupported_reason`).
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
from pallas_kernels.ragged_paged_attention import (mosaic_inputs_reason, mosaic_page_format_reason,
                                                   static_validate_inputs, token_info)

NUM_SMS = 132             # SMs of an sm_90 SXM part; the split heuristic fills them once


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static launch shape: kv tokens per pipeline step, SMEM slots, kv splits, lowering semantics."""

    block_kv: int = 128
    num_stages: int = 2
    num_kv_splits: int = 1
    lowering: str | None = "lane"   # "lane" (the prefill kernel's, pinned) or "warpgroup"; None = jax default

    def __post_init__(self):
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"block_kv must be 64, 128, 192 or 256, got {self.block_kv}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")
        if self.num_kv_splits < 1:
            raise ValueError(f"num_kv_splits must be >= 1, got {self.num_kv_splits}")
        check_lowering(self.lowering)


# --- shapes ------------------------------------------------------------------------------------------


def _prev_pow2(x: int) -> int:
    return 1 << max(0, x.bit_length() - 1)


def q_rows(num_q_heads: int, num_kv_heads: int) -> int:
    """Rows of q each CTA loads: from its first head's row rounded down to 8, enough to cover the group.

    With Hq % 8 == 0 the offset of the group inside its 8-row tile is `(h * group) % 8` for every token;
    otherwise it depends on the token too and may be anything up to 7."""
    group = num_q_heads // num_kv_heads
    if num_q_heads % ROW_ALIGN == 0:
        max_r0 = max((h * group) % ROW_ALIGN for h in range(num_kv_heads))
    else:
        max_r0 = ROW_ALIGN - 1
    return -(-(max_r0 + group) // ROW_ALIGN) * ROW_ALIGN


def choose_config(num_tokens: int, num_slots: int, pages_per_seq: int, num_q_heads: int,
                  num_kv_heads: int, page_size: int, block_kv: int = 128,
                  num_stages: int = 2) -> DecodeConfig:
    """128-token blocks in 2 stages, and kv splits in powers of two only until tokens x kv heads x splits
    fills the SMs once (the sweep behind it: pallas_kernels/README.md, Mosaic GPU decode kernel)."""
    del num_slots, num_q_heads
    ctas = max(1, num_tokens * num_kv_heads)
    blocks = max(1, pl.cdiv(pages_per_seq * page_size, block_kv))
    splits = min(_prev_pow2(blocks), next_pow2(pl.cdiv(NUM_SMS, ctas)))
    return DecodeConfig(block_kv=block_kv, num_stages=num_stages, num_kv_splits=splits)


def smem_bytes(head_dim: int, itemsize: int, config: DecodeConfig) -> int:
    """SMEM of one CTA: q tile, K and V slots, output tile (f32 with splits), lse, barriers, slack."""
    out_itemsize = 4 if config.num_kv_splits > 1 else itemsize
    tiles = (ROWS + 2 * config.num_stages * config.block_kv) * head_dim * itemsize
    out = ROWS * head_dim * out_itemsize + (ROWS * 4 if config.num_kv_splits > 1 else 0)
    return tiles + out + 8 * (1 + 4 * config.num_stages) + 2048


def page_format_reason(*, head_dim: int, page_size: int, dtype, config: DecodeConfig | None = None) -> str | None:
    """Why this kernel cannot read pages of this format (None when it can)."""
    return mosaic_page_format_reason(head_dim=head_dim, page_size=page_size, dtype=dtype,
                                     block_kv=(config or DecodeConfig()).block_kv)


def unsupported_reason(q, k_pages, page_table=None, *, sliding_window=None, soft_cap=None,
                       config: DecodeConfig | None = None) -> str | None:
    """Why this kernel cannot take these inputs (None when it can); shapes and dtypes only, no tracing."""
    config = config or DecodeConfig()
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    if sliding_window is not None:
        return "sliding_window is not supported by the Mosaic GPU decode kernel yet"
    if soft_cap is not None:
        return "soft_cap is not supported by the Mosaic GPU decode kernel yet"
    if page_table is not None and num_tokens > page_table.shape[0]:
        return (f"prefill-shaped batch (T={num_tokens} > S={page_table.shape[0]}): the decode kernel takes "
                f"T <= S; use the prefill kernel")
    if (reason := mosaic_inputs_reason(q, k_pages, block_kv=config.block_kv)) is not None:
        return reason
    if num_q_heads % num_kv_heads or q_rows(num_q_heads, num_kv_heads) > ROWS:
        return f"q heads per kv head must fit a {ROWS}-row tile, got {num_q_heads}/{num_kv_heads}"
    if (smem := smem_bytes(head_dim, jnp.dtype(q.dtype).itemsize, config)) > SMEM_BYTES:
        return f"{config} needs {smem} bytes of SMEM at head_dim {head_dim}, more than {SMEM_BYTES}"
    return None


# --- kernel ------------------------------------------------------------------------------------------

def _kernel(
    # inputs
    info_ref,        # [T, 2] int32 (slot, kv_hi)
    page_table_ref,  # [S, P] int32
    q_ref,           # [T * Hq (padded to 8 rows), D]
    k_pages_ref,     # [N, page_size, Hkv, D]
    v_pages_ref,     # [N, page_size, Hkv, D]
    *refs,           # outputs (o | o_part, lse), then scratch
    sm_scale: float, num_q_heads: int, group: int, qrows: int, block_kv: int, num_stages: int,
    num_splits: int, oob_page: int, interpret: bool,
):
    if num_splits == 1:
        (o_ref, q_smem, k_smem, v_smem, o_smem, q_bar, k_bar, v_bar, k_free, v_free) = refs
    else:
        (o_ref, lse_ref, q_smem, k_smem, v_smem, o_smem, lse_smem, q_bar, k_bar, v_bar, k_free,
         v_free) = refs
    t = lax.axis_index("t")
    h = lax.axis_index("h")
    split = lax.axis_index("k")
    wg = lax.axis_index("wg")
    page_size = k_pages_ref.shape[1]
    pages_per_seq = page_table_ref.shape[1]
    pages_per_block = block_kv // page_size
    head_dim = q_ref.shape[1]
    dtype = q_ref.dtype

    s = info_ref[t, 0]
    kv_hi = info_ref[t, 1]
    total_blocks = (kv_hi + block_kv - 1) // block_kv
    per_split = (total_blocks + num_splits - 1) // num_splits
    b_lo = split * per_split
    n_blocks = jnp.maximum(jnp.minimum(total_blocks, b_lo + per_split) - b_lo, 0)
    # Blocks whose every position is < kv_hi take the unmasked body; at most the split's last is masked.
    n_full = jnp.clip(kv_hi // block_kv - b_lo, 0, n_blocks)
    first_row = t * num_q_heads + h * group
    base_row = first_row // ROW_ALIGN * ROW_ALIGN
    r0 = first_row - base_row             # the group's first row inside the q tile

    @pl.when(wg == 0)
    def _compute():
        @pl.when(n_blocks > 0)
        def _load_q():
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(base_row, qrows)], q_smem.at[pl.ds(0, qrows)],
                                    q_bar.at[0])
            plgpu.barrier_wait(q_bar.at[0])
            plgpu.barrier_wait(k_bar.at[0])

        def kv_step(i, carry, *, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(i, num_stages)
            block = b_lo + i

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                return acc_ref[...]

            if interpret:  # jax 0.10's interpreter has no wgmma with a transposed operand
                scores = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
            else:
                scores = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            scores = scores * (sm_scale * LOG2E)                        # base-2 logits
            if masked:
                mask = wgmma_iota(scores.shape, 1, interpret) + block * block_kv < kv_hi
                scores = jnp.where(mask, scores, MASK_VALUE)
            m_next = jnp.maximum(m_i, scores.max(axis=1))
            alpha = jnp.exp2(m_i - m_next)
            p = jnp.exp2(scores - lax.broadcast_in_dim(m_next, scores.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)

            plgpu.barrier_wait(v_bar.at[slot])
            if masked:
                pl.when(kv_hi % page_size != 0)(functools.partial(zero_stale_v, v_smem, slot, block, kv_hi,
                                                                  block_kv=block_kv, interpret=interpret))

            def wait_next_k():
                @pl.when(i + 1 < n_blocks)
                def _():
                    plgpu.barrier_wait(k_bar.at[lax.rem(i + 1, num_stages)])

            acc = accumulate_pv(acc, p16, v_smem, slot, v_free, wait_next_k, interpret=interpret)
            return acc, m_next, l_i

        acc, m_i, l_i = softmax_state(head_dim, interpret)
        carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), (acc, m_i, l_i))
        carry = lax.cond(n_full < n_blocks,
                         lambda c: lax.fori_loop(n_full, n_blocks, functools.partial(kv_step, masked=True), c),
                         lambda c: c, carry)
        acc, m_i, l_i = carry

        # Empty ranges (padding tokens, splits past the end) have acc == 0 and l == 0: zeros out.
        inv_l = 1.0 / jnp.maximum(l_i, 1e-30)
        out = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
        if num_splits == 1:
            o_smem[...] = out.astype(o_ref.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(r0, group)], o_ref.at[pl.ds(first_row, group)])
        else:
            o_smem[...] = out
            lse_smem[...] = jnp.where(l_i > 0, m_i + jnp.log2(jnp.maximum(l_i, 1e-30)), MASK_VALUE)
            plgpu.commit_smem()
            cta = (t * k_pages_ref.shape[2] + h) * num_splits + split
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, qrows)], o_ref.at[pl.ds(cta * qrows, qrows)])
            plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, qrows)], lse_ref.at[cta])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _memory():
        pages_in_range = (kv_hi + page_size - 1) // page_size

        def block_pages(block):
            """Physical pages of kv block `block`; past the range, the out-of-bounds page (zeros)."""
            pages = []
            for j in range(pages_per_block):
                idx = block * pages_per_block + j
                page = page_table_ref[s, jnp.minimum(idx, pages_per_seq - 1)]
                pages.append(jnp.where(idx < pages_in_range, page, oob_page))
            return pages

        def copy_block(pages_ref, smem, bar, pages, slot):
            for j, page in enumerate(pages):
                plgpu.copy_gmem_to_smem(pages_ref.at[page, :, h, :],
                                        smem.at[slot, pl.ds(j * page_size, page_size)], bar.at[slot])

        @pl.loop(0, n_blocks)
        def _stream(i):
            slot = lax.rem(i, num_stages)
            reuse = i >= num_stages
            pages = block_pages(b_lo + i)   # page-table loads overlap the wait for a free slot
            pl.when(reuse)(lambda: plgpu.barrier_wait(k_free.at[slot]))
            copy_block(k_pages_ref, k_smem, k_bar, pages, slot)
            pl.when(reuse)(lambda: plgpu.barrier_wait(v_free.at[slot]))
            copy_block(v_pages_ref, v_smem, v_bar, pages, slot)

        @pl.loop(jnp.maximum(n_blocks - num_stages, 0), n_blocks)
        def _drain(i):  # observe the last releases too (cheap; the interpreter checks every phase)
            slot = lax.rem(i, num_stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def _merge_splits(o_part, lse, num_tokens: int, num_q_heads: int, num_kv_heads: int, qrows: int,
                  dtype) -> jax.Array:
    """One XLA fusion: log-sum-exp (base 2) merge of the splits' normalised rows -> o [T, Hq, D].

    o_part [T * Hkv * K * qrows, D] f32, lse [T * Hkv * K, qrows] f32; the group's rows start at
    r0 = (t * Hq + h * group) % 8 inside each CTA's qrows rows."""
    head_dim = o_part.shape[-1]
    group = num_q_heads // num_kv_heads
    splits = lse.shape[0] // (num_tokens * num_kv_heads)
    o_part = o_part.reshape(num_tokens, num_kv_heads, splits, qrows, head_dim)
    lse = lse.reshape(num_tokens, num_kv_heads, splits, qrows)
    t = jnp.arange(num_tokens, dtype=jnp.int32)[:, None, None]
    h = jnp.arange(num_kv_heads, dtype=jnp.int32)[None, :, None]
    g = jnp.arange(group, dtype=jnp.int32)[None, None, :]
    rows = (t * num_q_heads + h * group) % ROW_ALIGN + g                      # [T, Hkv, group]
    lse = jnp.take_along_axis(lse, rows[:, :, None, :], axis=3)              # [T, Hkv, K, group]
    o_part = jnp.take_along_axis(o_part, rows[:, :, None, :, None], axis=3)  # [T, Hkv, K, group, D]
    w = jnp.exp2(lse - lse.max(axis=2, keepdims=True))                       # empty splits: 0
    out = (w[..., None] * o_part).sum(axis=2) / w.sum(axis=2)[..., None]
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "config", "interpret"))
def paged_decode_mgpu(
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
    config: DecodeConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention for decode-shaped batches (T <= S) as a Mosaic GPU kernel.

    Same signature and semantics as `ragged_paged_attention_pallas` (see `ragged_paged_attention.py`).

    Args:
      q: [T, Hq, D] new tokens of all sequences, flattened; rows past cu_q_lens[num_seqs] are padding.
      k_pages, v_pages: [N, page_size, Hkv, D] page pools.
      kv_lens: [S] context length of each sequence after this step (new tokens included).
      page_table: [S, P] physical page of each logical page.
      cu_q_lens: [S + 1] boundaries of each sequence's tokens in q.
      num_seqs: [] number of real sequences.
      sm_scale: softmax scale.
      sliding_window, soft_cap: must be None (NotImplementedError otherwise; see `unsupported_reason`).
      config: launch shape; None = `choose_config` on the static shapes.
      interpret: run in Mosaic GPU's interpreter (CPU). jax 0.10's interpreter lacks a few primitives:
        the two matmuls are `lax.dot_general` on the same SMEM tiles instead of wgmma, layout casts are
        dropped, and q / the pool get the zero padding that TMA's out-of-bounds fill gives on the
        device. Everything else (page-table TMAs, barriers, masks, V zeroing, stores) is the GPU kernel.

    Returns:
      o: [T, Hq, D] in q's dtype; padding rows are zeros.
    """
    static_validate_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_slots, pages_per_seq = page_table.shape
    if config is None:
        config = choose_config(num_tokens, num_slots, pages_per_seq, num_q_heads, num_kv_heads, page_size)
    reason = unsupported_reason(q, k_pages, page_table, sliding_window=sliding_window, soft_cap=soft_cap,
                                config=config)
    if reason is not None:
        raise NotImplementedError(reason)
    if num_tokens == 0:
        return jnp.zeros(q.shape, q.dtype)
    info = token_info(cu_q_lens, num_seqs, kv_lens, num_tokens, pages_per_seq * page_size)
    return launch(info, page_table, q, k_pages, v_pages, sm_scale=sm_scale, config=config,
                  interpret=interpret)


def launch(info, page_table, q, k_pages, v_pages, *, sm_scale: float, config: DecodeConfig,
           interpret: bool = False) -> jax.Array:
    """The kernel (and the split merge) over precomputed `token_info` (inputs already validated)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    qrows = q_rows(num_q_heads, num_kv_heads)
    stages, block_kv, splits = config.num_stages, config.block_kv, config.num_kv_splits
    out_dtype = jnp.float32 if splits > 1 else q.dtype
    scratch = [
        tiled_smem((ROWS, head_dim), q.dtype),
        tiled_smem((stages, block_kv, head_dim), k_pages.dtype),
        tiled_smem((stages, block_kv, head_dim), v_pages.dtype),
        plgpu.SMEM((ROWS, head_dim), out_dtype),
    ]
    if splits > 1:
        scratch.append(plgpu.SMEM((ROWS,), jnp.float32))
    scratch += [
        plgpu.Barrier(num_arrivals=1, num_barriers=1),
        plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=stages),
        plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    ]
    oob_page = k_pages.shape[0]               # one past the pool: TMA fills the box with zeros
    flat_rows = num_tokens * num_q_heads
    q2 = q.reshape(flat_rows, head_dim)       # bitcast
    padded_rows = pl.cdiv(flat_rows, ROW_ALIGN) * ROW_ALIGN
    if padded_rows != flat_rows:              # tiled TMA views need whole 8-row tiles (Hq % 8 != 0 only)
        q2 = jnp.pad(q2, ((0, padded_rows - flat_rows), (0, 0)))
    if interpret:
        # The interpreter raises on out-of-bounds TMA boxes where the hardware fills zeros: give the
        # last q box and the page `num_pages` real (zero) memory.
        q2 = jnp.pad(q2, ((0, qrows), (0, 0)))
        k_pages = jnp.pad(k_pages, ((0, 1), (0, 0), (0, 0), (0, 0)))
        v_pages = jnp.pad(v_pages, ((0, 1), (0, 0), (0, 0), (0, 0)))
    if splits == 1:
        out_type = jax.ShapeDtypeStruct((flat_rows, head_dim), q.dtype)
    else:
        ctas = num_tokens * num_kv_heads * splits
        out_type = (jax.ShapeDtypeStruct((ctas * qrows, head_dim), jnp.float32),
                    jax.ShapeDtypeStruct((ctas, qrows), jnp.float32))
    kernel = functools.partial(_kernel, sm_scale=sm_scale, num_q_heads=num_q_heads, group=group,
                               qrows=qrows, block_kv=block_kv, num_stages=stages, num_splits=splits,
                               oob_page=oob_page, interpret=interpret)
    out = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=tuple(scratch),
        grid=(num_tokens, num_kv_heads, splits),
        grid_names=("t", "h", "k"),
        num_threads=2,
        thread_name="wg",
        compiler_params=compiler_params(config.lowering),
        interpret=interpret_params() if interpret else None,
    )(info, page_table, q2, k_pages, v_pages)
    if splits == 1:
        return out.reshape(num_tokens, num_q_heads, head_dim)
    return _merge_splits(*out, num_tokens, num_q_heads, num_kv_heads, qrows, q.dtype)
