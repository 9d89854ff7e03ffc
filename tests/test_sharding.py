"""jpaged.sharding, models.sharding and jpaged.loader.sharded: tensor/data parallel on 8 virtual CPU devices give one device's tokens; shardings
follow the specs; loading reads only each device's slice; 2 processes on loopback reproduce 1 device.

Tests marked `@on_cpu_devices(n)` run their body in a child process with n CPU devices
(tests/multihost/devices.py), so the device count never leaks into other tests.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tests.multihost.devices import REPO, cpu_env, on_cpu_devices


@pytest.mark.parametrize("model_name", ["kv8", "kv2"])
@pytest.mark.slow
@on_cpu_devices(8)
def test_tensor_parallel_greedy_tokens_match_one_device(model_name):
    from jpaged import sharding
    from tests.multihost.greedy import greedy, tiny_model
    model = tiny_model(model_name)
    want, want_logits = greedy(model)
    for tp in (2, 4, 8):
        mesh = sharding.make_mesh(tp)
        got, logits = greedy(sharding.shard_model(model, mesh), mesh)
        np.testing.assert_array_equal(got, want, err_msg=f"tp={tp}")
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0, err_msg=f"tp={tp}")


@on_cpu_devices(8)
def test_data_parallel_replicas_each_match_one_device():
    """dp=2 x tp=2 and dp=2 x tp=4: one SPMD step, each replica its own requests and page pool."""
    import jax
    from jpaged import sharding
    from tests.multihost.greedy import PROMPTS, greedy, greedy_replicas, tiny_model
    model = tiny_model("kv2")
    requests = [PROMPTS, ([7, 7, 3], [250, 1, 2, 3, 4, 5, 6, 8])]
    want = [greedy(model, prompts=prompts)[0] for prompts in requests]
    for tp in (2, 4):
        mesh = sharding.make_mesh(tp, 2)
        got = greedy_replicas(sharding.shard_model(model, mesh), mesh, requests)
        for r in range(2):
            np.testing.assert_array_equal(got[r], want[r], err_msg=f"tp={tp} replica {r}")
    from models.sharding import REPLICA_KV_CACHE_SPEC
    mesh = sharding.make_mesh(1, 2)
    cache = sharding.new_replica_kv_cache(sharding.kv_cache_spec(model, mesh, page_size=4), mesh, num_pages=4)
    assert cache.k[0].sharding.spec == REPLICA_KV_CACHE_SPEC
    assert [s.data.shape[0] for s in cache.k[0].addressable_shards] == [1, 1]
    assert len({s.device for s in cache.k[0].addressable_shards}) == 2 <= jax.device_count()


@on_cpu_devices(8)
def test_parameter_and_cache_shardings_follow_the_specs():
    import jax
    from jax.sharding import PartitionSpec as P
    from jpaged import sharding
    from tests.multihost.greedy import tiny_model

    def spec_and_shard(x):
        return x.sharding.spec, x.addressable_shards[0].data.shape

    m = sharding.shard_model(tiny_model("kv8"), sharding.make_mesh(4))   # E 64, Hq*D 128, Hkv*D 128, F 128
    layer = m.layers[1]
    assert spec_and_shard(m.embed_tokens.embedding[...]) == (P("model", None), (64, 64))
    assert spec_and_shard(m.lm_head.kernel[...]) == (P(None, "model"), (64, 64))
    assert spec_and_shard(layer.self_attn.q_proj.kernel[...]) == (P(None, "model"), (64, 32))
    assert spec_and_shard(layer.self_attn.k_proj.kernel[...]) == (P(None, "model"), (64, 32))
    assert spec_and_shard(layer.self_attn.o_proj.kernel[...]) == (P("model", None), (32, 64))
    assert spec_and_shard(layer.mlp.up_proj.kernel[...]) == (P(None, "model"), (64, 32))
    assert spec_and_shard(layer.mlp.down_proj.kernel[...]) == (P("model", None), (32, 64))
    assert spec_and_shard(layer.input_layernorm.weight[...]) == (P(), (64,))
    assert spec_and_shard(m.norm.weight[...]) == (P(), (64,))

    mesh = sharding.make_mesh(8)
    m = sharding.shard_model(tiny_model("kv2"), mesh)                     # 2 kv heads repeated to 8
    attn = m.layers[0].self_attn
    assert m.config.num_kv_heads == 8 and attn.num_kv_heads == 8
    assert spec_and_shard(attn.k_proj.kernel[...]) == (P(None, "model"), (64, 16))
    assert spec_and_shard(attn.v_proj.bias[...]) == (P("model"), (16,))
    assert spec_and_shard(attn.q_proj.bias[...]) == (P("model"), (16,))
    assert spec_and_shard(m.embed_tokens.embedding[...]) == (P("model", None), (32, 64))
    spec = sharding.kv_cache_spec(m, mesh, page_size=4)
    assert spec.bytes_per_page == 2 * 2 * 4 * 1 * 16 * 4    # per shard: K and V, 2 layers, 1 of 8 kv heads, f32
    cache = sharding.new_kv_cache(spec, mesh, num_pages=3)
    assert spec_and_shard(cache.k[0]) == (P(None, None, "model"), (3, 4, 1, 16))  # kv heads; no trailing None
    assert {s.device for s in cache.v[1].addressable_shards} == set(jax.devices())


@on_cpu_devices(8)
def test_attention_and_embedding_run_per_shard_under_shard_map():
    """The model's attention is a shard_map over the mesh (Pallas kernels cannot be auto-partitioned),
    and so is the embedding lookup (left to XLA, the GPU partitioner all-gathers the whole table)."""
    import jax
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from jpaged import sharding
    from models.kv_cache import StepInput
    from tests.multihost.greedy import PROMPTS, batch_step, tiny_model
    mesh = sharding.make_mesh(4, 2)
    model = sharding.shard_model(tiny_model("kv2"), mesh)
    graphdef, state = nnx.split(model)
    cache = sharding.new_kv_cache(sharding.kv_cache_spec(model, mesh, page_size=4), mesh, num_pages=12)
    step = StepInput(**batch_step([list(p) for p in PROMPTS], [0, 0]))
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda s, c, x: nnx.merge(graphdef, s)(c, x))(state, cache, step)
    maps = [e.params["in_specs"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    # First the vocab-parallel embedding lookup (table split over the vocabulary, ids whole), then
    # one attention per layer on its own kv heads.
    assert maps[0] == (P("model", None), P())
    assert len(maps[1:]) == model.config.num_layers
    assert all(spec[3] == P(None, None, "model") for spec in maps[1:])


@on_cpu_devices(8)
def test_embedding_lookup_split_over_the_vocabulary_equals_a_gather():
    """Ids in every device's rows, on the shard boundaries and repeated; the table is never gathered."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jpaged import sharding
    from models.sharding import lookup_embedding
    table = jax.random.normal(jax.random.key(0), (64, 16), jnp.float32)
    ids = jnp.asarray([0, 7, 8, 15, 16, 31, 32, 63, 5, 5, 40], jnp.int32)
    for tp, dp in ((2, 1), (4, 2), (8, 1)):
        mesh = sharding.make_mesh(tp, dp)
        split = jax.device_put(table, NamedSharding(mesh, P("model", None)))
        with jax.set_mesh(mesh):
            lookup = jax.jit(lookup_embedding)
            got = lookup(split, ids)
            hlo = lookup.lower(split, ids).compile().as_text()
        np.testing.assert_array_equal(np.asarray(got), np.asarray(table)[np.asarray(ids)], err_msg=f"tp={tp}")
        assert "all-gather" not in hlo, f"tp={tp}: the table was gathered"
    odd = jnp.ones((63, 16), jnp.float32)  # a vocabulary the axis does not divide stays replicated
    with jax.set_mesh(sharding.make_mesh(2)):
        np.testing.assert_array_equal(np.asarray(lookup_embedding(odd, ids[:7])), np.ones((7, 16)))


@pytest.mark.slow
@on_cpu_devices(8)
def test_safetensors_load_reads_only_each_devices_slice():
    import pathlib
    import tempfile

    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import save_file
    from jpaged import sharding
    from jpaged.loader import sharded as sharded_loader
    from tests.multihost.greedy import CONFIGS, greedy, tiny_model

    tmp_path = pathlib.Path(tempfile.mkdtemp())
    for name, tp in (("kv8", 4), ("kv2", 8)):
        model = tiny_model(name)
        tensors = {_hf_name(path): (np.asarray(v.get_value()).T if path[-1] == "kernel" else np.asarray(v.get_value()))
                   for path, v in nnx.to_flat_state(nnx.state(model))}
        names = sorted(tensors)
        files = [str(tmp_path / f"{name}-{i}.safetensors") for i in range(2)]
        for i, file in enumerate(files):  # a two-file checkpoint
            save_file({k: np.ascontiguousarray(tensors[k]) for k in names[i::2]}, file)

        reads = []
        real_open = sharded_loader.safe_open

        class SpyOpen:
            def __init__(self, *a, **k):
                self.f = real_open(*a, **k)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_slice(self, tensor):
                real = self.f.get_slice(tensor)

                class Slice:
                    def __getitem__(_, index):
                        out = real[index]
                        reads.append((tensor, out.shape))
                        return out
                return Slice()

        sharded_loader.safe_open = SpyOpen
        try:
            mesh = sharding.make_mesh(tp)
            loaded = sharded_loader.load_safetensors_sharded(files, CONFIGS[name], mesh, dtype=jnp.float32)
        finally:
            sharded_loader.safe_open = real_open
        q = "model.layers.0.self_attn.q_proj.weight"
        assert sorted(shape for t, shape in reads if t == q) == [(128 // tp, 64)] * tp
        k = "model.layers.0.self_attn.k_proj.weight"
        assert all(shape[0] < tensors[k].shape[0] for t, shape in reads if t == k), name
        np.testing.assert_array_equal(greedy(loaded, mesh)[0], greedy(model)[0])


@on_cpu_devices(4)
def test_load_model_under_a_mesh_reads_an_hf_dir_straight_into_shards():
    """What tensor-parallel serving loads through: every weight arrives placed on the mesh, equal to the
    one-device load (kv heads repeated to one per device)."""
    import tempfile

    import jax
    from flax import nnx
    from jpaged import sharding
    from jpaged.loader import load_model
    from tests.hf_reference import tiny_hf_model
    from tests.multihost.greedy import greedy

    with tempfile.TemporaryDirectory() as tmp:
        tiny_hf_model("llama3", seed=3).save_pretrained(tmp, safe_serialization=True)
        mesh = sharding.make_mesh(4)
        placed, _ = load_model(tmp, dtype="float32", mesh=mesh)
        one, _ = load_model(tmp, dtype="float32")
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(nnx.state(placed)))
    assert placed.config.num_kv_heads == 4
    np.testing.assert_array_equal(greedy(placed, mesh)[0], greedy(one)[0])


def _hf_name(path) -> str:
    """jpaged parameter path -> HF checkpoint name (the inverse of models.weights.HF_WEIGHT_MAP)."""
    name = ".".join(map(str, path)).replace(".kernel", ".weight").replace("embedding", "weight")
    return name if name.startswith("lm_head") else "model." + name


@pytest.mark.slow
@on_cpu_devices(8)
def test_orbax_restore_places_each_shard():
    import tempfile

    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from jpaged import sharding
    from jpaged.loader.sharded import load_orbax_sharded
    from tests.multihost.greedy import CONFIGS, greedy, tiny_model
    model = tiny_model("kv2")
    with tempfile.TemporaryDirectory() as tmp, ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(tmp, "ckpt"), nnx.to_pure_dict(nnx.state(model)))
        ckpt.wait_until_finished()
        mesh = sharding.make_mesh(4)
        loaded = load_orbax_sharded(os.path.join(tmp, "ckpt"), CONFIGS["kv2"], mesh, dtype=jnp.float32)
    assert loaded.layers[0].mlp.gate_proj.kernel[...].sharding.spec == P(None, "model")
    np.testing.assert_array_equal(greedy(loaded, mesh)[0], greedy(model)[0])


@pytest.mark.slow
@on_cpu_devices(8)
def test_generate_under_a_user_mesh_matches_one_device():
    import jax
    from jpaged import sharding
    from jpaged.generate import generate
    from tests.multihost.greedy import tiny_model
    model = tiny_model("kv2")
    prompts, lens = np.array([[5, 17, 99, 3], [1, 2, 250, 0]], np.int32), np.array([4, 3], np.int32)
    key = jax.random.key(0)
    want = generate(model, prompts, lens, max_new_tokens=6, key=key, page_size=4)
    mesh = sharding.make_mesh(4, 2)
    with jax.set_mesh(mesh):
        got = generate(sharding.shard_model(model, mesh), prompts, lens, max_new_tokens=6, key=key, page_size=4)
    np.testing.assert_array_equal(sharding.to_host(got.tokens), np.asarray(want.tokens))


@settings(max_examples=30, deadline=None)
@given(num_kv_heads=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2, 4]), tp=st.sampled_from([2, 4, 8]))
def test_repeated_kv_heads_serve_the_same_q_heads(num_kv_heads, group, tp):
    """After tp_model_config repeats kv heads, q head i still reads its original kv head's values."""
    import jax.numpy as jnp
    from models.sharding import repeat_heads, tp_model_config
    from tests.multihost.greedy import CONFIGS
    num_heads, head_dim = num_kv_heads * group, 2
    if num_heads % tp or (num_kv_heads < tp and tp % num_kv_heads):
        return
    cfg = tp_model_config(CONFIGS["kv8"].__class__(
        architecture="LlamaForCausalLM", vocab_size=8, hidden_size=4, intermediate_size=8 * tp, num_layers=1,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim), tp)
    assert cfg.num_kv_heads % tp == 0
    kv = np.arange(num_kv_heads * head_dim, dtype=np.float32)[None]              # [1, Hkv * D]
    repeated = np.asarray(repeat_heads(jnp.asarray(kv), head_dim, cfg.num_kv_heads // num_kv_heads))
    for i in range(num_heads):
        new_head = i // (num_heads // cfg.num_kv_heads)
        old_head = i // (num_heads // num_kv_heads)
        np.testing.assert_array_equal(repeated[0, new_head * head_dim:(new_head + 1) * head_dim],
                                      kv[0, old_head * head_dim:(old_head + 1) * head_dim])
        assert new_head // (cfg.num_kv_heads // tp) == i // (num_heads // tp)  # same shard as its q head


def test_mesh_and_config_errors_name_the_argument():
    from jax.sharding import PartitionSpec as P
    from jpaged import sharding
    from models.sharding import param_spec, tp_model_config
    from tests.multihost.greedy import CONFIGS
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        sharding.make_mesh(0)
    with pytest.raises(ValueError, match="devices needed"):
        sharding.make_mesh(4096)
    with pytest.raises(ValueError, match="num_heads"):
        tp_model_config(CONFIGS["kv8"], 3)
    with pytest.raises(ValueError, match="no partition spec"):
        param_spec("layers.0.mystery.kernel", (4, 4), 2)
    assert param_spec("lm_head.kernel", (64, 250), 8) == P()  # odd vocab: replicated
    with pytest.raises(ValueError, match="process_id"):
        sharding.initialize_distributed("127.0.0.1:1", 2, 5)
    with pytest.raises(ValueError, match="num_processes"):
        sharding.initialize_distributed(coordinator_address="127.0.0.1:1")


@pytest.mark.long  # tests/engine/test_multihost.py covers two processes in the short profile
@pytest.mark.slow
def test_two_processes_on_loopback_reproduce_one_device():
    """2 processes x 2 CPU devices, JAX CPU collectives over 127.0.0.1, tp=4 across both processes."""
    worker = [sys.executable, "-m", "tests.multihost.worker"]
    single = subprocess.run(worker + ["--tp", "1"], env=cpu_env(1), cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-4000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(worker + ["--tp", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                        "--process-id", str(i)], env=cpu_env(2), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    want = json.loads(single.stdout.strip().splitlines()[-1])
    for out, _ in outs:
        got = json.loads(out.strip().splitlines()[-1])
        assert got["tokens"] == want["tokens"] and got["devices"] == 4 and got["processes"] == 2
