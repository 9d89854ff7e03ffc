"""The cache map: every KV page's state as JSON-able data, and its renderings (PNG block map, HTML page).

Where it sits: `Engine.cache_map()` calls `cache_map(scheduler)` between steps; `jpaged cache-map` and
the server's `GET /debug/kv-cache` render it with `render_png` / `render_html`. Reading only: nothing
here changes the block manager.

Device page states: free; running (held by one sequence); shared (refcount > 1: prefix sharing or a
copy-on-write fork); fetching (held by a sequence whose prefix is on its way from the host tier);
cached (idle in the prefix cache, reusable); window_released (free or cached, last released by a
sliding window). Host page states: free, swapped (held by a swapped sequence), cached (host tier).
The disk tier is summed up (pages, bytes): it can hold far more pages than a picture shows.
"""
from __future__ import annotations

import io

from jpaged.engine.sequence import SequenceStatus

DEVICE_STATES = ("free", "running", "shared", "fetching", "cached", "window_released")
HOST_STATES = ("free", "swapped", "cached")
COLOURS = {"free": "#eeeeee", "running": "#4c78a8", "shared": "#f58518", "fetching": "#b279a2",
           "cached": "#54a24b", "window_released": "#9d755d", "swapped": "#e45756"}


def cache_map(scheduler) -> dict:
    """Every page of the scheduler's block manager, by tier, with the sequences that hold them."""
    bm = scheduler.block_manager
    holders: dict[int, list[int]] = {}
    fetching = {s.seq_id for s in scheduler.fetching}
    seqs = scheduler.running + scheduler.fetching + scheduler.swapped + scheduler.waiting
    for seq in scheduler.running + scheduler.fetching:
        for page in seq.block_table:
            if page >= 0:
                holders.setdefault(page, []).append(seq.seq_id)
    cached = bm.prefix_cache.cached_pages() if bm.prefix_cache is not None else set()
    free = set(bm.free_pages())
    pages = []
    for page in range(bm.num_pages):
        held_by = holders.get(page, [])
        refs = bm.ref_count(page)
        if refs > 1:
            state = "shared"
        elif refs == 1:
            state = "fetching" if held_by and held_by[0] in fetching else "running"
        elif page in bm.window_released:
            state = "window_released"
        elif page in cached:
            state = "cached"
        else:
            assert page in free, page
            state = "free"
        pages.append({"page": page, "state": state, "ref_count": refs, "seq_ids": held_by,
                      "prefix_cached": page in cached})
    host_holders = {h: s.seq_id for s in scheduler.swapped for h in s.host_block_table if h >= 0}
    host_pages = [{"page": h, "state": state, "seq_ids": [host_holders[h]] if h in host_holders else []}
                  for h, state in enumerate(bm.host_states())]
    disk = bm.tiers.disk if bm.tiers is not None else None
    c = bm.counters
    return {
        "page_size": bm.page_size,
        "device": {"num_pages": bm.num_pages, "counts": _counts(pages, DEVICE_STATES), "pages": pages},
        "host": {"num_pages": bm.num_host_pages, "counts": _counts(host_pages, HOST_STATES), "pages": host_pages,
                 "tier": bm.has_host_tier},
        "disk": {"enabled": disk is not None, "num_pages": disk.num_pages if disk else 0,
                 "bytes": disk.num_bytes if disk else 0, "capacity_bytes": disk.capacity_bytes if disk else 0,
                 "directory": str(disk.dir) if disk else None},
        "sequences": [{"seq_id": s.seq_id, "request_id": s.request_id, "status": s.status.value,
                       "num_tokens": s.num_tokens, "num_computed_tokens": s.num_computed_tokens,
                       "block_table": list(s.block_table), "host_block_table": list(s.host_block_table)}
                      for s in seqs if s.status is not SequenceStatus.FINISHED],
        "counters": dict(vars(c)),
    }


def _counts(pages: list[dict], states: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(states, 0)
    for p in pages:
        counts[p["state"]] += 1
    return counts


def render_png(data: dict, *, title: str | None = None, columns: int | None = None) -> bytes:
    """A block map: one cell per device page, then one per host page, coloured by state; a held cell
    shows its sequences' ids (refcount in brackets when shared)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    rows_of = []
    for name in ("device", "host"):
        pages = data[name]["pages"]
        if pages:
            rows_of.append((name, pages))
    n_max = max((len(p) for _, p in rows_of), default=1)
    cols = columns or max(8, min(32, int(n_max ** 0.5 * 1.6) + 1))
    grid_rows = [(name, -(-len(pages) // cols)) for name, pages in rows_of]
    total_rows = sum(r for _, r in grid_rows) + len(grid_rows)
    fig, ax = plt.subplots(figsize=(max(6.0, cols * 0.42), max(2.5, total_rows * 0.42 + 1.4)))
    y = 0
    for name, pages in rows_of:
        ax.text(0, y + 0.6, f"{name} ({len(pages)} pages)", fontsize=9, fontweight="bold", va="center")
        y += 1
        for i, p in enumerate(pages):
            r, col = divmod(i, cols)
            ax.add_patch(Rectangle((col, y + r), 0.94, 0.94, facecolor=COLOURS[p["state"]], edgecolor="#999999",
                                   linewidth=0.4))
            label = ",".join(str(s) for s in p["seq_ids"][:3]) if p["seq_ids"] else ""
            if len(p["seq_ids"]) > 3:
                label += "+"
            if label:
                ax.text(col + 0.47, y + r + 0.5, label, ha="center", va="center", fontsize=5.5,
                        color="white" if p["state"] in ("running", "shared", "swapped", "fetching") else "black")
        y += -(-len(pages) // cols)
    ax.set_xlim(-0.2, cols + 0.2)
    ax.set_ylim(y + 0.2, -0.2)
    ax.set_axis_off()
    used = {p["state"] for _, pages in rows_of for p in pages}
    handles = [Patch(facecolor=COLOURS[s], edgecolor="#999999", label=s.replace("_", " "))
               for s in COLOURS if s in used]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 7) or 1,
              fontsize=8, frameon=False)
    disk = data["disk"]
    subtitle = (f"page = {data['page_size']} tokens; labels: sequence ids"
                + (f"; disk tier: {disk['num_pages']} pages, {disk['bytes'] / 2**20:.1f} MiB" if disk["enabled"] else ""))
    ax.set_title((title + "\n" if title else "") + subtitle, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def render_html(refresh_seconds: float = 1.0, png_url: str = "?format=png") -> str:
    """A page that shows the PNG block map and reloads it every `refresh_seconds`."""
    ms = int(refresh_seconds * 1000)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jpaged KV cache</title>
<style>body {{ font-family: sans-serif; margin: 1em; }} img {{ max-width: 100%; }}</style></head>
<body><h3>jpaged KV cache map</h3><img id="map" src="{png_url}" alt="KV cache block map">
<pre id="counts"></pre>
<script>
const base = "{png_url}";
setInterval(() => {{
  document.getElementById("map").src = base + (base.includes("?") ? "&" : "?") + "t=" + Date.now();
  fetch("?format=json").then(r => r.json()).then(d => {{
    document.getElementById("counts").textContent =
      "device " + JSON.stringify(d.device.counts) + "\\nhost " + JSON.stringify(d.host.counts) +
      "\\ndisk " + d.disk.num_pages + " pages\\n" + JSON.stringify(d.counters);
  }}).catch(() => {{}});
}}, {ms});
</script></body></html>
"""
