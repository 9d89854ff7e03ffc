"""Device time of `jpaged.sampling.sample` at the offline run's decode shape (256 rows x 128,256 vocab):
greedy, temperature 1 and top-p 0.9 rows, against argmax alone, and the top-k / top-p filter alone; each
chained in one jit, 20 calls.

    PYTHONPATH=. OUT=bench/results python bench/sampler_cost.py
"""
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from jpaged import sampling
from jpaged.sampling_params import SamplingParams

S, V = (256, 128256) if jax.default_backend() == "gpu" else (8, 512)
logits = jax.random.normal(jax.random.PRNGKey(0), (S, V), jnp.float32)
key = jax.random.PRNGKey(1)
res = {}
def chain(fn, *args, n=20):
    @jax.jit
    def run(x, *a):
        def body(i, acc):
            return acc + fn(x + acc[:, None].astype(x.dtype) * 0, *a).astype(jnp.float32)
        return jax.lax.fori_loop(0, n, body, jnp.zeros((S,), jnp.float32))
    jax.block_until_ready(run(logits, *args))
    ts = []
    for _ in range(7):
        t = time.perf_counter(); jax.block_until_ready(run(logits, *args)); ts.append((time.perf_counter() - t) / n)
    return statistics.median(ts) * 1e6
for name, params in [("greedy", SamplingParams(temperature=0.0, max_tokens=1)),
                     ("temp1", SamplingParams(temperature=1.0, max_tokens=1)),
                     ("topp", SamplingParams(temperature=1.0, top_p=0.9, max_tokens=1))]:
    t = sampling.SamplingTensors.from_params([params] * S, num_rows=S, vocab_size=V)
    t = jax.tree.map(jnp.asarray, t)
    res[name] = chain(lambda x, tt: sampling.sample(x, tt, key).tokens, t)
res["argmax_only"] = chain(lambda x: jnp.argmax(x, axis=-1))
# The top-k / top-p filter alone (jpaged.sampling.apply_top_k_top_p, one sort per row).
for label, k, p in (("top_p_0.9", V, 0.9), ("top_k_50_top_p_0.9", 50, 0.9)):
    top_k, top_p = jnp.full((S,), k, jnp.int32), jnp.full((S,), p, jnp.float32)
    res[f"filter_{label}_sort"] = chain(lambda x, top_k=top_k, top_p=top_p: jnp.argmax(
        sampling.apply_top_k_top_p(x, top_k, top_p), axis=-1))
res["argmax_plus_logsoftmax"] = chain(lambda x: jnp.argmax(x, -1) + jax.nn.log_softmax(x)[:, 0].astype(jnp.int32))
print(json.dumps(res, indent=1))
out = os.environ.get("OUT")
if out:
    json.dump(dict(command="OUT=... python bench/sampler_cost.py", device=str(jax.devices()[0]), jax=jax.__version__, S=S, V=V, us_per_call=res),
              open(f"{out}/sampler_cost.json", "w"), indent=1)
