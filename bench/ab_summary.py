"""The summary of an old/new A/B run of bench/ab_main.sh: one JSON and a printed table.

    python -m bench.ab_summary RAW_DIR OUT_JSON [--command "the command line"] [--revisions "old=... new=..."]

RAW_DIR holds the pairs the driver wrote (latency_{old,new}.json, kernels_mgpu_prefill_{old,new}.json,
throughput_{old,new}.json) and steps.tsv (one line per step: name, side, exit status, wall seconds,
limit seconds, command). A missing or failed side leaves its figures None; the ratio is new / old.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

SIDES = ("old", "new")
DEFAULT_PREFILL_CONFIG = "page16_kv128_st2"   # MosaicConfig()'s launch shape at the engine's page size

# figure -> (raw file stem, path of keys inside it, unit); the first three are the A/B's figures.
FIGURES = {
    "batch1_decode_tok_s": ("latency", ("batch1", "decode_tok_s"), "tok/s"),
    "prefill_tflops": ("kernels_mgpu_prefill", ("prefill", "mosaic", DEFAULT_PREFILL_CONFIG, "tflops"), "TFLOP/s"),
    "offline_output_tok_s": ("throughput", ("results", "fixed", "output_tok_s"), "tok/s"),
    # Context: the device time beneath each figure, and baselines that do not depend on the tree (their
    # ratio says how much the machine itself moved between the two runs).
    "batch1_raw_step_ms": ("latency", ("batch1", "raw_step_ms"), "ms"),
    "batch1_mbu": ("latency", ("batch1", "mbu"), ""),
    "batch64_decode_tok_s": ("latency", ("batched", "decode_tok_s"), "tok/s"),
    "batch64_host_overhead_fraction": ("latency", ("batched", "host_overhead_fraction"), ""),
    "copy_bandwidth_tb_s": ("latency", ("copy_bandwidth_bytes_s",), "TB/s"),
    "prefill_best_tflops": ("kernels_mgpu_prefill", ("prefill", "mosaic_best_tflops"), "TFLOP/s"),
    "prefill_torch_sdpa_tflops": ("kernels_mgpu_prefill", ("prefill", "torch_sdpa_tflops"), "TFLOP/s"),
    "offline_seconds": ("throughput", ("results", "fixed", "seconds"), "s"),
    "offline_mixed_step_ms": ("throughput", ("results", "fixed", "step_breakdown", "mixed", "mean_step_ms"), "ms"),
    "offline_decode_step_ms": ("throughput", ("results", "fixed", "step_breakdown", "decode", "mean_step_ms"), "ms"),
    "offline_compilations": ("throughput", ("results", "fixed", "compilations"), ""),
}
MAIN_FIGURES = ("batch1_decode_tok_s", "prefill_tflops", "offline_output_tok_s")


def dig(data, keys):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def load(raw: pathlib.Path, stem: str, side: str):
    path = raw / f"{stem}_{side}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:          # a step killed while writing
        return None


def read_steps(raw: pathlib.Path) -> list[dict]:
    path = raw / "steps.tsv"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        name, side, rc, wall, limit, command = line.split("\t", 5)
        steps.append(dict(name=name, side=side, rc=int(rc), wall_s=int(wall), limit_s=int(limit), command=command))
    return steps


def device_of(results: dict) -> dict:
    """Device kind and versions, from the first result that records them."""
    for stem, side in (("latency", "new"), ("latency", "old"), ("throughput", "new"), ("throughput", "old")):
        info = dig(results.get((stem, side)), ("device",))
        if isinstance(info, dict):
            return {k: info.get(k) for k in ("device_kind", "num_devices", "jax", "jaxlib", "flax", "host")}
    for side in SIDES:
        r = results.get(("kernels_mgpu_prefill", side))
        if r:
            return dict(device_kind=r.get("device"), jax=r.get("jax"), jaxlib=r.get("jaxlib"))
    return {}


def summarize(raw: pathlib.Path, command: str, revisions: str = "") -> dict:
    stems = {stem for stem, _, _ in FIGURES.values()}
    results = {(stem, side): load(raw, stem, side) for stem in stems for side in SIDES}
    figures = {}
    for name, (stem, keys, unit) in FIGURES.items():
        row = {side: dig(results[(stem, side)], keys) for side in SIDES}
        if name == "prefill_tflops" and row["old"] is None and row["new"] is None:
            keys = ("prefill", "mosaic_best_tflops")      # the config labels changed: fall back to the best
            row = {side: dig(results[(stem, side)], keys) for side in SIDES}
        if unit == "TB/s":
            row = {side: v / 1e12 if v is not None else None for side, v in row.items()}
        ok = all(isinstance(row[s], (int, float)) for s in SIDES) and row["old"]
        figures[name] = dict(old=row["old"], new=row["new"], new_over_old=row["new"] / row["old"] if ok else None,
                             unit=unit, source=f"{stem}_<side>.json: {'.'.join(keys)}")
    revs = dict(item.split("=", 1) for item in revisions.split() if "=" in item)
    return dict(benchmark="ab_main", command=command, revisions=revs, device=device_of(results),
                main_figures=list(MAIN_FIGURES),
                figures=figures, steps=read_steps(raw),
                commands={f"{stem}_{side}": dig(r, ("command",)) or dig(r, ("commands",))
                          for (stem, side), r in sorted(results.items()) if r},
                raw="ab_raw.tgz: every step's JSON and steps.tsv")


def print_summary(summary: dict) -> None:
    dev = summary["device"]
    print(f"\nA/B old vs new on {dev.get('device_kind')} (jax {dev.get('jax')})")
    print(f"  {'figure':<32} {'old':>12} {'new':>12} {'new/old':>8}")
    for name, f in summary["figures"].items():
        cells = [f"{f[s]:>12,.3f}" if isinstance(f[s], float) else f"{str(f[s]):>12}" for s in SIDES]
        ratio = f"{f['new_over_old']:>8.3f}" if f["new_over_old"] is not None else f"{'-':>8}"
        mark = "*" if name in summary["main_figures"] else " "
        print(f"{mark} {name:<32} {cells[0]} {cells[1]} {ratio}")
    for step in summary["steps"]:
        print(f"  step {step['name']} {step['side']}: exit {step['rc']}, {step['wall_s']} s of {step['limit_s']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", type=pathlib.Path, help="directory of the step JSONs and steps.tsv")
    p.add_argument("out", type=pathlib.Path, help="summary JSON to write")
    p.add_argument("--command", default="", help="the driver's command line, recorded in the summary")
    p.add_argument("--revisions", default="", help="'old=REV new=REV', recorded in the summary")
    args = p.parse_args(argv)
    if not args.raw.is_dir():
        raise SystemExit(f"raw: {args.raw} is not a directory")
    summary = summarize(args.raw, args.command, args.revisions)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    print(f"\nwrote {args.out}")
    failed = [s for s in summary["steps"] if s["rc"] != 0]
    return 1 if failed or any(summary["figures"][m]["new_over_old"] is None for m in MAIN_FIGURES) else 0


if __name__ == "__main__":
    sys.exit(main())
