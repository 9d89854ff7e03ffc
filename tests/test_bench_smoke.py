"""Smoke tests of the end-to-end benchmarks: each runs on CPU on the tiny preset and writes valid JSON.

These check the programs, not the speed: tiny workloads, the jnp reference attention.
"""
import json

import pytest

from bench import common, hf_baseline, latency, prefix, throughput
from jpaged import bench_cli

ENGINE = ["--model", "tiny-llama", "--max-num-seqs", "4", "--max-num-batched-tokens", "32"]


def _read(path):
    result = json.loads(path.read_text())
    assert result["device"]["jax"] if "device" in result else result["versions"]["torch"]
    return result


@pytest.mark.long  # a full bench run; the CI budget keeps the cheap bench checks
@pytest.mark.slow  # ~40 s on a loaded 2-core machine: HF import, the first compilations, three runs
def test_latency_reports_mbu_host_overhead_profile_and_hf(tmp_path):
    out = tmp_path / "latency.json"
    latency.main(ENGINE + ["--prompt-len", "8", "--new-tokens", "4", "--batch", "2", "--batch-new-tokens", "3",
                           "--raw-reps", "2", "--profile", "--hf", "--hf-modes", "eager", "--out", str(out)])
    r = _read(out)
    assert r["model_shape"]["num_layers"] == 2 and r["copy_bandwidth_bytes_s"] > 0
    for fig in (r["batch1"], r["batched"]):
        assert fig["decode_tok_s"] > 0 and fig["raw_step_ms"] > 0 and 0 < fig["mbu"]
        assert fig["floor_ms"] < fig["floor_all_weights_ms"]  # the untied embedding table is not read
        assert fig["profile"]["device_ms"] > 0 and fig["profile"]["num_steps"] >= 1
    assert r["batched"]["batch"] == 2
    assert r["baselines"]["hf_transformers"]["batch1"]["eager"]["decode_tok_s"] > 0
    assert r["command"].startswith("python -m bench.latency --model tiny-llama")


@pytest.mark.long  # a full bench run; the CI budget keeps the cheap bench checks
def test_throughput_runs_both_workloads_with_hf_side_by_side(tmp_path):
    out = tmp_path / "throughput.json"
    throughput.main(ENGINE + ["--num-requests", "6", "--input-len", "12", "--output-len", "4",
                              "--nano-num-seqs", "4", "--nano-min-len", "4", "--nano-max-len", "20",
                              "--hf", "--hf-batch-sizes", "2", "--out", str(out)])
    r = _read(out)
    fixed, nano = r["results"]["fixed"], r["results"]["nano"]
    assert fixed["output_tokens"] == 6 * 4 and fixed["input_tokens"] == 6 * 12
    assert fixed["output_tok_s"] > 0 and fixed["total_tok_s"] > fixed["output_tok_s"]
    assert nano["workload"]["num_requests"] == 4 and nano["output_tok_s"] > 0
    assert r["baselines"]["hf_transformers"]["fixed"]["eager_b2"]["output_tok_s"] > 0
    assert fixed["speedup_vs_best_hf"] > 0


def test_nano_workload_lengths_are_seeded_and_in_range():
    args = throughput.parse_args(["--nano-num-seqs", "256"])
    first, again = throughput.workload_lengths("nano", args), throughput.workload_lengths("nano", args)
    assert first == again
    assert all(100 <= n <= 1024 for lengths in first for n in lengths) and len(first[0]) == 256


@pytest.mark.long  # a full bench run; the CI budget keeps the cheap bench checks
def test_prefix_reports_ttft_with_caching_on_and_off(tmp_path):
    out = tmp_path / "prefix.json"
    prefix.main(ENGINE + ["--num-requests", "4", "--prefix-len", "40", "--question-len", "5",
                          "--new-tokens", "3", "--out", str(out)])
    r = _read(out)
    assert r["caching_on"]["prefix_cache_hits"] > 0 and r["caching_off"]["prefix_cache_hits"] == 0
    assert r["caching_on"]["mean_ttft_ms"] > 0 and r["ttft_speedup"] > 0
    assert r["caching_on"]["output_tokens"] == r["caching_off"]["output_tokens"] == 4 * 3


def test_hf_baseline_records_a_failing_mode_instead_of_raising():
    cfg = common.model_config("tiny-llama")
    result = hf_baseline.throughput(cfg, batch_sizes=[1], input_len=4, output_len=2, modes=["eager"],
                                    model=object())  # not a model: generate fails
    assert "error" in result["eager_b1"]


def test_random_model_draws_weights_on_device_in_its_dtype():
    model = common.random_model(common.model_config("tiny-llama"), "bfloat16")
    kernel = model.layers[0].mlp.up_proj.kernel[...]
    assert str(kernel.dtype) == "bfloat16" and 0.01 < float(kernel.astype("float32").std()) < 0.03
    assert float(model.norm.weight[...].astype("float32").min()) == 1.0


def test_bench_cli_dispatches_and_reports_bad_input(tmp_path, capsys):
    assert bench_cli.main([]) == 2
    assert bench_cli.main(["nope"]) == 2
    assert bench_cli.main(["latency", "--model", "no-such-preset"]) == 1
    assert "--model must be a preset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--batch"):
        latency.parse_args(["--batch", "65"])


def test_multi_gpu_help_runs_without_starting_jax():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "bench/multi_gpu.py", "--help"], cwd=common.REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--engine-dp" in proc.stdout and "--no-tp-sweep" in proc.stdout


@pytest.mark.long  # a full bench run; the CI budget keeps the cheap bench checks
def test_tp_step_profile_and_xla_options_ab_run_on_two_cpu_devices(tmp_path):
    """The two TP-step tools of bench/README.md "Session 5", at the tiny shape with the jnp attention."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    tiny = ["--model", "tiny-kv8", "--tp", "1,2", "--attn-impl", "reference", "--context", "64"]
    for script, extra in (("bench/tp_step_profile.py", ["--tokens", "4"]),
                          ("bench/xla_options_ab.py", ["--variants", '{"default": {}, "min1": {"xla_gpu_graph_min_graph_size": 1}}'])):
        out = tmp_path / "out.json"
        proc = subprocess.run([sys.executable, script, *tiny, *extra, "--out", str(out)], cwd=common.REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = json.loads(out.read_text())["rows"]
        assert {row["tp"] for row in rows} == {1, 2}
        assert all(row.get("ms_per_step", row.get("ms_median", 0)) > 0 for row in rows)


@pytest.mark.long  # a full bench run; the CI budget keeps the cheap bench checks
def test_step_profile_times_a_mixed_step_with_and_without_the_split(tmp_path):
    import json
    import os
    import subprocess
    import sys
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "bench/tp_step_profile.py", "--model", "tiny-kv8", "--tp", "1",
                           "--attn-impl", "reference", "--batch", "3", "--context", "40", "--prefill", "9,5",
                           "--tokens", "32", "--slots", "8", "--mixed-split", "both", "--out", str(out)],
                          cwd=common.REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["mixed_split"], row["num_tokens"], row["num_slots"]) for row in rows] == [(True, 32, 8),
                                                                                        (False, 32, 8)]
    assert rows[0]["prefill"] == [9, 5] and "trace" in rows[0]
