"""bench/ab_main.sh and bench/ab_summary.py on CPU: the driver's plumbing with a stand-in for the GPU runs,
and the summary's figures, ratios and missing sides."""
import json
import os
import pathlib
import subprocess
import sys
import tarfile

from bench import ab_summary

REPO = pathlib.Path(__file__).resolve().parents[1]


def _figures(side_scale: float) -> dict:
    """Minimal JSONs in the shape the three benchmarks write, keyed by the driver's file stems."""
    return {
        "latency": dict(command="python -m bench.latency", device=dict(device_kind="TEST GPU", jax="0.0"),
                        copy_bandwidth_bytes_s=3e12,
                        batch1=dict(decode_tok_s=100.0 * side_scale, raw_step_ms=5.0, mbu=0.8),
                        batched=dict(decode_tok_s=5000.0, host_overhead_fraction=0.01)),
        "kernels_mgpu_prefill": dict(device="TEST GPU", jax="0.0", commands=["python bench/kernels_mgpu.py"],
                                     prefill=dict(mosaic={ab_summary.DEFAULT_PREFILL_CONFIG: dict(tflops=500.0)},
                                                  mosaic_best_tflops=520.0, torch_sdpa_tflops=600.0)),
        "throughput": dict(command="python -m bench.throughput",
                           results=dict(fixed=dict(output_tok_s=9000.0 * side_scale, seconds=28.0, compilations=0,
                                                   step_breakdown=dict(mixed=dict(mean_step_ms=56.0),
                                                                       decode=dict(mean_step_ms=24.0))))),
    }


def test_summary_gives_ratios_and_leaves_a_missing_side_none(tmp_path):
    for side, scale in (("old", 1.0), ("new", 1.1)):
        for stem, data in _figures(scale).items():
            if stem == "throughput" and side == "new":
                continue                                   # a step that timed out wrote nothing
            (tmp_path / f"{stem}_{side}.json").write_text(json.dumps(data))
    (tmp_path / "steps.tsv").write_text("latency\told\t0\t60\t100\tcd x && python -m bench.latency\n"
                                        "throughput\tnew\t124\t200\t200\tcd y && python -m bench.throughput\n")
    out = tmp_path / "summary.json"
    assert ab_summary.main([str(tmp_path), str(out), "--command", "OLD=a bash bench/ab_main.sh",
                            "--revisions", "old=abc new=def"]) == 1
    s = json.loads(out.read_text())
    f = s["figures"]
    assert abs(f["batch1_decode_tok_s"]["new_over_old"] - 1.1) < 1e-9
    assert f["prefill_tflops"]["old"] == 500.0 and f["prefill_tflops"]["new_over_old"] == 1.0
    assert f["offline_output_tok_s"]["new"] is None and f["offline_output_tok_s"]["new_over_old"] is None
    assert f["copy_bandwidth_tb_s"]["old"] == 3.0
    assert s["device"]["device_kind"] == "TEST GPU" and s["revisions"] == dict(old="abc", new="def")
    assert [(st["name"], st["side"], st["rc"]) for st in s["steps"]] == [("latency", "old", 0), ("throughput", "new", 124)]


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the GPU runs: `python -m bench.X ... --out P [--tag T]` writes a recorded-shape JSON.
if [ "$1" = -m ] && [ "$2" != bench.ab_summary ]; then
  mod=${2#bench.}; shift 2; out=""; tag=""
  while [ $# -gt 0 ]; do case $1 in --out) out=$2; shift;; --tag) tag=$2; shift;; esac; shift; done
  side=$(basename "$PWD")                              # the old tree is .../old, the new one the repo
  [ "$side" = old ] || side=new
  [ "$mod" = kernels_mgpu ] && out="$out/kernels_mgpu$tag.json" && mod=kernels_mgpu_prefill
  exec "$REAL_PYTHON" -c "import json, sys; json.dump(json.load(open(sys.argv[1]))[sys.argv[2]], open(sys.argv[3], 'w'))" \\
    "$FIGURES_$side" "$mod" "$out"
fi
exec "$REAL_PYTHON" "$@"
"""


def test_driver_runs_old_and_new_interleaved_and_returns_three_files(tmp_path):
    old = tmp_path / "old"
    (old / "bench").mkdir(parents=True)
    (old / "bench" / "latency.py").write_text("")
    (old / "jpaged").mkdir()
    (old / "jpaged" / "__init__.py").write_text("")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(FAKE_PYTHON.replace("$FIGURES_$side", str(tmp_path) + "/figures_$side.json"))
    (fake / "python").chmod(0o755)
    for side, scale in (("old", 1.0), ("new", 1.25)):
        (tmp_path / f"figures_{side}.json").write_text(json.dumps(_figures(scale)))
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", REAL_PYTHON=sys.executable, OLD=str(old),
               OUT=str(out), AB_CACHE=str(tmp_path / "cache"), OLD_REV="r1")
    run = subprocess.run(["bash", str(REPO / "bench" / "ab_main.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ab_main.log", "ab_main_summary.json", "ab_raw.tgz"]
    s = json.loads((out / "ab_main_summary.json").read_text())
    assert [s["figures"][m]["new_over_old"] for m in ab_summary.MAIN_FIGURES] == [1.25, 1.0, 1.25]
    assert [(st["name"], st["side"]) for st in s["steps"]] == [
        (name, side) for name in ("latency", "throughput", "kernels_mgpu_prefill") for side in ("old", "new")]
    assert all(st["rc"] == 0 for st in s["steps"]) and s["revisions"]["old"] == "r1"
    assert f"cd {old} && " in s["steps"][0]["command"] and "--model llama3-8b" in s["steps"][0]["command"]
    with tarfile.open(out / "ab_raw.tgz") as tar:
        assert "./throughput_new.json" in tar.getnames()
