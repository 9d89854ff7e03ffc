"""Paged-attention decode on a few SMs: a persistent, swap-AB Mosaic GPU kernel (Hopper: TMA + wgmma).

Status (session 10, H200): exact (bench/decode_narrow.py's device checks) but slow per CTA: 0.53 TB/s on
16 CTAs (0.69 with 128-token blocks) where its data movement alone reads 1.29, 3.3-3.4 TB/s on 132 against
3.9-4.0 for the Triton decode kernel. Its compute warpgroup's per-block chain is the bound. Opt-in: nothing
routes to it (pallas_kernels/README.md, "Narrow decode kernel").

Why: the engine's mixed step runs the decode rows' attention (memory-bound, ~340 us a layer at 373
sequences x ctx 640 on the H100) after the prefill rows' GEMMs (compute-bound). Run side by side on
disjoint SMs (XLA command buffers in CONCURRENT mode, the GEMM on 132 - k CTAs), the attention must read
KV at ~100+ GB/s per SM on k ~ 16-24 SMs: 5x what `paged_decode_mgpu` does per SM (its compute
warpgroup pads the group's 4 q rows to wgmma's M = 64, so each 64-token block costs ~1 us of MMA and
softmax). A TMA stream on 16 CTAs reads 1.8 TB/s (session 9's probe, bench/README.md).

Swap AB: the kv tokens are wgmma's M and the q rows its N (N = 16 >= group, padded):
    S^T [B, N] = K [B, D] . Q^T [D, N]          (K from SMEM as the A operand, q tile transposed as B)
    softmax over axis 0 (the tokens) per column (q head)
    O^T [D, N] += V^T [D, B] . P^T [B, N]       (V's SMEM tile transposed as A, P^T stored to SMEM)
4x fewer MMA rows than the padded M = 64 form at GQA 4, and 16 exps per token instead of 64. wgmma
requires A and B of one product to share a swizzle: P^T's rows are N * 2 = 32 bytes, so V's and P^T's
SMEM tiles use the 32-byte swizzle ((8, 16) tiles), K and q the 128-byte one.

Persistent: `num_ctas` CTAs, each takes work items (token, kv head) w = cta, cta + num_ctas, ...; the
memory warpgroup streams every item's q tile and kv blocks through one ring of `num_stages` slots with no
gap between items (each item's page list arrives by one bulk copy of its `item_descriptors` row, a work
item ahead), the compute warpgroup consumes them and writes each item's O^T [D, N] (bf16) with one TMA.
A jnp epilogue picks the group's columns and transposes them into o [T, Hq, D] (~4x the output's bytes,
~1 % of the KV bytes at the engine's shapes).

Same semantics as `paged_decode_mgpu` (decode-shaped batches, T <= S; `token_info` gives each token its
slot and kv range end; padding tokens store zeros; pages at or past the range are fetched as the
out-of-bounds page, which TMA fills with zeros; V rows past kv_hi in the last block are zeroed in SMEM).
Supported: bf16/f16, head_dim 64/128, page_size a power of two in [8, block_kv], q heads per kv head <= 8
(and 16 with Hq % 8 == 0), page tables whose two descriptor rows fit in SMEM beside the ring; no sliding
window or soft-cap (NotImplementedError, `unsupported_reason`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import (LOG2E, MASK_VALUE, ROW_ALIGN, SMEM_BYTES, check_lowering,
                                        compiler_params, interpret_params, layout_cast, tiled_smem)
from pallas_kernels.paged_decode_mgpu import token_info
from pallas_kernels.ragged_paged_attention_kernel import static_validate_inputs

NUM_SMS = 132          # H100 / H200 SXM
N_COLS = 16            # q rows per work item: wgmma's N (32-byte rows of P^T in bf16)


@dataclasses.dataclass(frozen=True)
class NarrowDecodeConfig:
    """Static launch shape: persistent CTAs (None = one per SM), ring slots, lowering semantics."""

    num_ctas: int | None = None
    num_stages: int = 5
    block_kv: int = 64       # kv tokens per pipeline step: wgmma's M of S^T (64 or 128)
    # Independent (compute, memory) warpgroup pairs per CTA, each with its own ring. 2 matches the reference
    # in the interpreter but gave wrong outputs (~1e31) on the H200 in its one device check (session 10,
    # bench/results/decode_narrow_h200_v3_pipes.json; cause not found yet, suspected: 512 threads leave 128
    # registers per thread and the launch failed): refused off the interpreter.
    num_pipes: int = 1
    lowering: str | None = "lane"
    # Ablation for bench/decode_narrow.py: "stream" keeps the memory warpgroup and the barriers but the
    # compute warpgroup does no math (the output is zeros): the rate of the data movement alone.
    probe: str = "full"

    def __post_init__(self):
        if self.num_ctas is not None and self.num_ctas < 1:
            raise ValueError(f"num_ctas must be >= 1 or None, got {self.num_ctas}")
        if self.block_kv not in (64, 128):
            raise ValueError(f"block_kv must be 64 or 128, got {self.block_kv}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")
        if self.num_pipes not in (1, 2):
            raise ValueError(f"num_pipes must be 1 or 2, got {self.num_pipes}")
        check_lowering(self.lowering)
        if self.probe not in ("full", "stream"):
            raise ValueError(f"probe must be 'full' or 'stream', got {self.probe!r}")


def swizzle32_smem(shape, dtype):
    """SMEM in (8, 32-byte) tiles with the 32-byte swizzle: the layout of V and P^T (wgmma needs A and B
    of one product in the same swizzle, and P^T's rows are 32 bytes)."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((ROW_ALIGN, 32 // jnp.dtype(dtype).itemsize)),
                                                plgpu.SwizzleTransform(32)))


def desc_width(pages_per_seq: int, page_size: int, block_kv: int) -> int:
    """Columns of `item_descriptors`: 4 + the pages rounded up to whole blocks, the row rounded up to 128
    bytes (Mosaic GPU's copies move a multiple of the warpgroup size in bytes)."""
    per_block = block_kv // page_size
    return -(-(4 + -(-pages_per_seq // per_block) * per_block) // 32) * 32


def smem_bytes(head_dim: int, itemsize: int, config: NarrowDecodeConfig, pages_per_seq: int = 0,
               page_size: int = 16) -> int:
    desc = 2 * desc_width(pages_per_seq, page_size, config.block_kv) * 4
    ring = 2 * config.num_stages * config.block_kv * head_dim * itemsize
    q = 2 * N_COLS * head_dim * itemsize
    p = config.block_kv * N_COLS * itemsize
    o = head_dim * N_COLS * itemsize
    return config.num_pipes * (ring + q + p + o + desc + 8 * (6 + 4 * config.num_stages)) + 2048


def unsupported_reason(q, k_pages, page_table=None, *, sliding_window=None, soft_cap=None,
                       config: NarrowDecodeConfig | None = None, interpret: bool = False) -> str | None:
    """Why this kernel cannot take these inputs (None when it can); shapes and dtypes only."""
    config = config or NarrowDecodeConfig()
    if config.num_pipes > 1 and not interpret:
        return "num_pipes=2 is wrong on the GPU (session 10's device check); only the interpreter takes it"
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    if sliding_window is not None:
        return "sliding_window is not supported by the narrow decode kernel"
    if soft_cap is not None:
        return "soft_cap is not supported by the narrow decode kernel"
    if page_table is not None and num_tokens > page_table.shape[0]:
        return f"prefill-shaped batch (T={num_tokens} > S={page_table.shape[0]}): the decode kernels take T <= S"
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k_pages.dtype != q.dtype:
        return f"dtype must be bf16 or f16 for q and pages alike, got {q.dtype} and {k_pages.dtype}"
    if head_dim not in (64, 128):
        return f"head_dim must be 64 or 128, got {head_dim}"
    if page_size < ROW_ALIGN or page_size & (page_size - 1) or config.block_kv % page_size:
        return f"page_size must be a power of two in [8, {config.block_kv}], got {page_size}"
    if num_q_heads % num_kv_heads or q_offset_bound(num_q_heads, num_kv_heads) > N_COLS:
        return (f"q heads per kv head must fit {N_COLS} columns from an 8-aligned row, got "
                f"{num_q_heads}/{num_kv_heads}")
    pages_per_seq = 0 if page_table is None else page_table.shape[1]
    if (smem := smem_bytes(head_dim, jnp.dtype(q.dtype).itemsize, config, pages_per_seq, page_size)) > SMEM_BYTES:
        return f"{config} needs {smem} bytes of SMEM at head_dim {head_dim}, more than {SMEM_BYTES}"
    return None


def q_offset_bound(num_q_heads: int, num_kv_heads: int) -> int:
    """The largest (first row of a group inside its 8-aligned q tile) + group, over all tokens and heads."""
    group = num_q_heads // num_kv_heads
    if num_q_heads % ROW_ALIGN == 0:
        return max((h * group) % ROW_ALIGN for h in range(num_kv_heads)) + group
    return ROW_ALIGN - 1 + group


# --- kernel ------------------------------------------------------------------------------------------

def item_descriptors(info: jax.Array, page_table: jax.Array, *, page_size: int, block_kv: int,
                     oob_page: int) -> jax.Array:
    """desc[T, 4 + P'] int32: (slot, kv_hi, 0, 0, the slot's pages) per token, the pages at or past the
    kv range (and the padding up to P', `desc_width`) set to `oob_page`.

    One contiguous row per token, so that the memory warpgroup fetches an item's whole page list with one
    bulk copy, a work item ahead, and reads its page numbers from SMEM instead of a GMEM round trip per
    block (v1). On the H200 this changed nothing measurable (0.51 -> 0.53 TB/s on 16 CTAs): the compute
    warpgroup is the bound; it keeps the page-table reads off the stream once that bound moves."""
    num_tokens = info.shape[0]
    pages_per_seq = page_table.shape[1]
    width = desc_width(pages_per_seq, page_size, block_kv) - 4
    pages = jnp.pad(page_table[info[:, 0]], ((0, 0), (0, width - pages_per_seq)))
    in_range = jnp.arange(width, dtype=jnp.int32)[None, :] < (info[:, 1:2] + page_size - 1) // page_size
    pages = jnp.where(in_range, pages, oob_page)
    return jnp.concatenate([info, jnp.zeros((num_tokens, 2), jnp.int32), pages], axis=1).astype(jnp.int32)


def _kernel(info_ref, desc_ref, q_ref, k_pages_ref, v_pages_ref,     # inputs
            o_ref,                                                   # output [W, D, N]
            q_smem, k_smem, v_smem, p_smem, o_smem, desc_smem,       # scratch, a leading pipe axis
            q_bar, q_free, k_bar, v_bar, k_free, v_free, desc_bar,   # barriers, pipe-major
            *, num_pipes: int, **kwargs):
    """`num_pipes` independent pipelines per CTA, each a compute warpgroup (wg = p) and a memory warpgroup
    (wg = num_pipes + p) with their own SMEM and barriers, over the work items of worker
    `cta * num_pipes + p`: while one compute warpgroup waits on its chain (wgmma, softmax, fences), the
    other one computes."""
    wg = lax.axis_index("wg")
    cta = lax.axis_index("c")
    scratch = (q_smem, k_smem, v_smem, p_smem, o_smem, desc_smem)
    barriers = (q_bar, q_free, k_bar, v_bar, k_free, v_free, desc_bar)
    for p in range(num_pipes):
        refs = tuple(r.at[p] for r in scratch) + barriers
        for memory in (False, True):
            pl.when(wg == p + num_pipes * memory)(functools.partial(
                _pipeline, info_ref, desc_ref, q_ref, k_pages_ref, v_pages_ref, o_ref, *refs, pipe=p,
                worker=cta * num_pipes + p, memory=memory, **kwargs))


def _pipeline(info_ref, desc_ref, q_ref, k_pages_ref, v_pages_ref, o_ref,
              q_smem, k_smem, v_smem, p_smem, o_smem, desc_smem,
              q_bar, q_free, k_bar, v_bar, k_free, v_free, desc_bar,
              *, pipe: int, worker, memory: bool, sm_scale: float, num_q_heads: int, group: int, num_stages: int,
              num_workers: int, num_items: int, page_size: int, block_kv: int, interpret: bool,
              probe: str = "full"):
    """One warpgroup of pipeline `pipe` (its memory or its compute side) over worker `worker`'s items."""
    num_kv_heads = k_pages_ref.shape[2]
    pages_per_block = block_kv // page_size
    head_dim = q_ref.shape[1]
    dtype = q_ref.dtype
    my_items = (num_items - worker + num_workers - 1) // num_workers
    # This pipe's barriers: 2 per pipe for the q / descriptor slots, num_stages for the ring.
    q_bar, q_free, desc_bar = (lambda i, b=b: b.at[2 * pipe + i] for b in (q_bar, q_free, desc_bar))
    k_bar, v_bar, k_free, v_free = (lambda i, b=b: b.at[num_stages * pipe + i] for b in (k_bar, v_bar, k_free, v_free))

    def coords(i):
        """Work item i of this worker: (w, token, kv head)."""
        w = worker + i * num_workers
        return w, w // num_kv_heads, w % num_kv_heads

    def q_base(t, h):
        first_row = t * num_q_heads + h * group
        return first_row // ROW_ALIGN * ROW_ALIGN

    if memory:
        def fetch_desc(i):
            _, t, _ = coords(i)
            ds = lax.rem(i, 2)
            plgpu.copy_gmem_to_smem(desc_ref.at[t], desc_smem.at[ds], desc_bar(ds),
                                    **({} if interpret else dict(oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)))

        pl.when(my_items > 0)(lambda: fetch_desc(0))

        def copy_block(pages_ref, smem, bar, pages, slot, h):
            for j, page in enumerate(pages):
                plgpu.copy_gmem_to_smem(pages_ref.at[page, :, h, :],
                                        smem.at[slot, pl.ds(j * page_size, page_size)], bar)

        def item_body(i, g):
            _, t, h = coords(i)
            ds = lax.rem(i, 2)
            pl.when(i >= 2)(lambda: plgpu.barrier_wait(q_free(ds)))
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_base(t, h), N_COLS)], q_smem.at[ds], q_bar(ds))
            plgpu.barrier_wait(desc_bar(ds))
            # Slot 1 - ds held item i - 1's descriptor, read above in program order: the next one goes there.
            pl.when(i + 1 < my_items)(lambda: fetch_desc(i + 1))
            kv_hi = desc_smem[ds, 1]

            def block_body(b, g):
                slot = lax.rem(g, num_stages)
                reuse = g >= num_stages
                pages = [desc_smem[ds, 4 + b * pages_per_block + j] for j in range(pages_per_block)]
                pl.when(reuse)(lambda: plgpu.barrier_wait(k_free(slot)))
                copy_block(k_pages_ref, k_smem, k_bar(slot), pages, slot, h)
                pl.when(reuse)(lambda: plgpu.barrier_wait(v_free(slot)))
                copy_block(v_pages_ref, v_smem, v_bar(slot), pages, slot, h)
                return g + 1

            return lax.fori_loop(0, (kv_hi + block_kv - 1) // block_kv, block_body, g)

        g_end = lax.fori_loop(0, my_items, item_body, jnp.int32(0))

        # Observe the last releases too (the interpreter checks that every phase was waited for).
        @pl.loop(jnp.maximum(g_end - num_stages, 0), g_end)
        def _drain(g):
            slot = lax.rem(g, num_stages)
            plgpu.barrier_wait(k_free(slot))
            plgpu.barrier_wait(v_free(slot))

        @pl.loop(jnp.maximum(my_items - 2, 0), my_items)
        def _drain_q(i):
            plgpu.barrier_wait(q_free(lax.rem(i, 2)))

    else:
        scale = sm_scale * LOG2E

        def kv_hi_of(i):   # a GMEM load issued an item ahead of its use (clamped: a worker may have none)
            w, _, _ = coords(jnp.minimum(i, jnp.maximum(my_items - 1, 0)))
            return info_ref[jnp.minimum(w, num_items - 1) // num_kv_heads, 1]

        def item_body(i, carry):
            g, kv_hi = carry
            kv_hi_next = kv_hi_of(i + 1)
            w, _, _ = coords(i)
            qs = lax.rem(i, 2)
            plgpu.barrier_wait(q_bar(qs))
            acc = layout_cast(jnp.zeros((head_dim, N_COLS), jnp.float32), plgpu.Layout.WGMMA, interpret)
            m_i = layout_cast(jnp.full((N_COLS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(0),
                              interpret)
            l_i = layout_cast(jnp.zeros((N_COLS,), jnp.float32), plgpu.Layout.WGMMA.reduce(0), interpret)

            def block_body(b, carry):
                g, acc, m_i, l_i = carry
                slot = lax.rem(g, num_stages)
                plgpu.barrier_wait(k_bar(slot))
                if probe == "stream":
                    plgpu.barrier_arrive(k_free(slot))
                    plgpu.barrier_wait(v_bar(slot))
                    plgpu.barrier_arrive(v_free(slot))
                    return g + 1, acc, m_i, l_i

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem.at[slot], q_smem.at[qs].T)
                    return acc_ref[...]

                if interpret:
                    s_t = lax.dot_general(k_smem[slot], q_smem[qs], (((1,), (1,)), ((), ())),
                                          preferred_element_type=jnp.float32)
                else:
                    s_t = pl.run_scoped(qk, plgpu.ACC((block_kv, N_COLS), jnp.float32))
                plgpu.barrier_arrive(k_free(slot))
                s_t = s_t * scale                                           # [B, N], base-2 logits
                if interpret:
                    tok = lax.broadcasted_iota(jnp.int32, s_t.shape, 0)
                else:
                    tok = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0, layout=plgpu.Layout.WGMMA)
                s_t = jnp.where(tok + b * block_kv < kv_hi, s_t, MASK_VALUE)
                m_next = jnp.maximum(m_i, s_t.max(axis=0))
                alpha = jnp.exp2(m_i - m_next)
                p_t = jnp.exp2(s_t - lax.broadcast_in_dim(m_next, s_t.shape, [1]))
                l_i = l_i * alpha + p_t.sum(axis=0)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
                p_smem[...] = p_t.astype(dtype)
                plgpu.commit_smem()
                plgpu.barrier_wait(v_bar(slot))

                @pl.when((b + 1) * block_kv > kv_hi)
                def _zero_stale_v():   # V rows past kv_hi may hold NaN; 0 * NaN = NaN in P.V
                    for d0 in range(0, head_dim, N_COLS):
                        cols = v_smem.at[slot, :, pl.ds(d0, N_COLS)]
                        v = cols[...]
                        if interpret:
                            row = lax.broadcasted_iota(jnp.int32, v.shape, 0)
                        else:
                            row = plgpu.broadcasted_iota(jnp.int32, v.shape, 0, layout=plgpu.Layout.WGMMA)
                        cols[...] = jnp.where(row + b * block_kv < kv_hi, v, jnp.zeros_like(v))
                    plgpu.commit_smem()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, v_smem.at[slot].T, p_smem)

                if interpret:
                    acc = acc + lax.dot_general(v_smem[slot], p_smem[...], (((0,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)
                else:
                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free(slot))
                return g + 1, acc, m_next, l_i

            n_blocks = (kv_hi + block_kv - 1) // block_kv
            g, acc, m_i, l_i = lax.fori_loop(0, n_blocks, block_body, (g, acc, m_i, l_i))
            plgpu.barrier_arrive(q_free(qs))
            inv_l = 1.0 / jnp.maximum(l_i, 1e-30)      # empty ranges: acc == 0, l == 0 -> zeros
            out = acc * lax.broadcast_in_dim(inv_l, acc.shape, [1])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)     # the previous item's store left o_smem
            o_smem[...] = out.astype(o_ref.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[w])
            return g, kv_hi_next

        lax.fori_loop(0, my_items, item_body, (jnp.int32(0), kv_hi_of(0)))
        plgpu.wait_smem_to_gmem(0)


def _gather_groups(o_t, num_tokens: int, num_q_heads: int, num_kv_heads: int, dtype) -> jax.Array:
    """o_t [T * Hkv, D, N] -> o [T, Hq, D]: each item's group columns start at its row's offset in the
    8-aligned q tile."""
    head_dim = o_t.shape[1]
    group = num_q_heads // num_kv_heads
    o_t = o_t.reshape(num_tokens, num_kv_heads, head_dim, N_COLS)
    t = jnp.arange(num_tokens, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(num_kv_heads, dtype=jnp.int32)[None, :, None, None]
    g = jnp.arange(group, dtype=jnp.int32)[None, None, None, :]
    cols = (t * num_q_heads + h * group) % ROW_ALIGN + g                      # [T, Hkv, 1, group]
    out = jnp.take_along_axis(o_t, cols, axis=3)                              # [T, Hkv, D, group]
    return jnp.swapaxes(out, 2, 3).reshape(num_tokens, num_q_heads, head_dim).astype(dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "config", "interpret"))
def paged_decode_narrow(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale: float,
                        sliding_window: int | None = None, soft_cap: float | None = None,
                        config: NarrowDecodeConfig | None = None, interpret: bool = False) -> jax.Array:
    """Ragged paged attention for decode-shaped batches (T <= S) on `config.num_ctas` persistent CTAs.

    Same signature and semantics as `ragged_paged_attention_pallas` (see `ragged_paged_attention.py`):
    q [T, Hq, D]; k_pages, v_pages [N, page_size, Hkv, D]; kv_lens [S]; page_table [S, P];
    cu_q_lens [S + 1]; num_seqs []. Returns o [T, Hq, D] in q's dtype, padding rows zeros.
    `interpret=True` runs Mosaic GPU's interpreter (CPU): the wgmmas become `lax.dot_general` on the same
    SMEM tiles and layout casts are dropped; barriers, TMAs, masks and stores are the device kernel's."""
    static_validate_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    config = config or NarrowDecodeConfig()
    reason = unsupported_reason(q, k_pages, page_table, sliding_window=sliding_window, soft_cap=soft_cap,
                                config=config, interpret=interpret)
    if reason is not None:
        raise NotImplementedError(reason)
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return jnp.zeros(q.shape, q.dtype)
    num_slots, pages_per_seq = page_table.shape
    info = token_info(cu_q_lens, num_seqs, kv_lens, num_tokens, pages_per_seq * k_pages.shape[1])
    return launch(info, page_table, q, k_pages, v_pages, sm_scale=sm_scale, config=config, interpret=interpret)


def launch(info, page_table, q, k_pages, v_pages, *, sm_scale: float, config: NarrowDecodeConfig,
           interpret: bool = False) -> jax.Array:
    """The kernel and the group gather over precomputed `token_info` (inputs already validated)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    num_items = num_tokens * num_kv_heads
    num_ctas = min(config.num_ctas or NUM_SMS, num_items)
    stages = config.num_stages
    flat_rows = num_tokens * num_q_heads
    q2 = q.reshape(flat_rows, head_dim)
    # Every q tile is N_COLS rows from an 8-aligned row: pad so that the last one is in bounds.
    q2 = jnp.pad(q2, ((0, pl.cdiv(flat_rows, ROW_ALIGN) * ROW_ALIGN + N_COLS - flat_rows), (0, 0)))
    if interpret:   # the interpreter raises on out-of-bounds TMA boxes where the device fills zeros
        k_pages = jnp.pad(k_pages, ((0, 1), (0, 0), (0, 0), (0, 0)))
        v_pages = jnp.pad(v_pages, ((0, 1), (0, 0), (0, 0), (0, 0)))
    block_kv = config.block_kv
    desc = item_descriptors(info, page_table, page_size=page_size, block_kv=block_kv, oob_page=num_pages)
    pipes = config.num_pipes
    per_block = block_kv // page_size
    scratch = (
        tiled_smem((pipes, 2, N_COLS, head_dim), q.dtype),
        tiled_smem((pipes, stages, block_kv, head_dim), k_pages.dtype),
        swizzle32_smem((pipes, stages, block_kv, head_dim), v_pages.dtype),
        swizzle32_smem((pipes, block_kv, N_COLS), q.dtype),
        plgpu.SMEM((pipes, head_dim, N_COLS), q.dtype),
        plgpu.SMEM((pipes, 2, desc.shape[1]), jnp.int32),
        plgpu.Barrier(num_arrivals=1, num_barriers=2 * pipes),                          # q loaded
        plgpu.Barrier(num_arrivals=1, num_barriers=2 * pipes),                          # q slot free
        plgpu.Barrier(num_arrivals=per_block, num_barriers=stages * pipes),             # K block loaded
        plgpu.Barrier(num_arrivals=per_block, num_barriers=stages * pipes),             # V block loaded
        plgpu.Barrier(num_arrivals=1, num_barriers=stages * pipes),                     # K slot free
        plgpu.Barrier(num_arrivals=1, num_barriers=stages * pipes),                     # V slot free
        plgpu.Barrier(num_arrivals=1, num_barriers=2 * pipes),                          # descriptor loaded
    )
    kernel = functools.partial(_kernel, num_pipes=pipes, sm_scale=sm_scale, num_q_heads=num_q_heads,
                               group=num_q_heads // num_kv_heads, num_stages=stages, num_workers=num_ctas * pipes,
                               num_items=num_items, page_size=page_size, block_kv=block_kv, interpret=interpret,
                               probe=config.probe)
    o_t = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((num_items, head_dim, N_COLS), q.dtype),
        scratch_types=scratch,
        grid=(num_ctas,),
        grid_names=("c",),
        num_threads=2 * pipes,
        thread_name="wg",
        compiler_params=compiler_params(config.lowering),
        interpret=interpret_params() if interpret else None,
    )(info, desc, q2, k_pages, v_pages)
    return _gather_groups(o_t, num_tokens, num_q_heads, num_kv_heads, q.dtype)
