"""A deterministic engine with the Engine contract, for testing the server without a model.

Tokens are bytes: `encode(text)` is `[BOS] + list(text.encode())`, `decode` drops BOS/EOS and
decodes the bytes. Generation is hand-computable:
- greedy (temperature 0): output token k is the k-th byte of the prompt text, cycling, so a prompt
  "abc" generates "abcabc...";
- sampled: each token is a byte of the prompt picked by `random.Random(seed)` (sample j of n > 1 uses
  seed + j), so equal seeds give equal text; without a seed the engine's own counter seeds it.
- logprobs: the sampled token has logprob -0.5 and rank 1; the r-th alternative is byte (token + r - 1)
  mod 256 with logprob -0.5 * r. Prompt logprobs follow the same rule for every prompt token but the
  first (None).
One step emits one token per running sequence. Pages (4 tokens each) for prompt + max_tokens are
reserved when a request is admitted and released when it finishes or is aborted, so after any run
`num_free_pages == num_total_pages` must hold again. It asserts that one thread calls it.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import threading
import time

from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jpaged.sampling_params import SamplingParams

BOS, EOS = 256, 257
PAGE_SIZE = 4


class ByteTokenizer:
    """`encode_delay` seconds of sleep per encode stand in for a slow tokenizer."""

    eos_token_ids = [EOS]
    vocab_size = 258

    def __init__(self, encode_delay: float = 0.0):
        self.encode_delay = encode_delay

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.encode_delay:
            time.sleep(self.encode_delay)
        return ([BOS] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raw = bytes(t for t in ids if t < 256)
        text = raw.decode("utf-8", errors="replace")
        if not skip_special_tokens:
            text = "".join("<s>" if t == BOS else "</s>" if t == EOS else "" for t in ids if t >= 256) + text
        return text

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclasses.dataclass
class _Seq:
    index: int
    rng: random.Random | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list | None = None
    text: str = ""
    finish_reason: str | None = None


@dataclasses.dataclass
class _Req:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[_Seq]
    pages: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    prompt_logprobs: list | None = None


class FakeEngine:
    """Args: num_pages: pool size; max_num_seqs: sequences stepped at once; step_delay: seconds per step;
    fail_on: a prompt text that makes step() raise (to test a failing engine); stall_on: a prompt text
    whose first step sleeps `stall_seconds` (a stuck step); warmup_delay: seconds `warmup()` takes;
    encode_delay: seconds each tokenizer encode takes."""

    def __init__(self, *, num_pages: int = 256, max_num_seqs: int = 8, max_model_len: int = 128,
                 step_delay: float = 0.002, model_name: str = "fake-model", fail_on: str | None = None,
                 stall_on: str | None = None, stall_seconds: float = 1.0, warmup_delay: float = 0.0,
                 encode_delay: float = 0.0):
        self.tokenizer = ByteTokenizer(encode_delay)
        self.stall_on, self.stall_seconds = stall_on, stall_seconds
        self.warmup_delay = warmup_delay
        self.warmed_up = False
        self.eos_token_ids = {EOS}
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.num_pages = num_pages
        self.free_pages = num_pages
        self.max_num_seqs = max_num_seqs
        self.step_delay = step_delay
        self.fail_on = fail_on  # step() raises once a running prompt contains this text
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.num_added = 0
        self.num_aborted = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._seen_prompts: set[tuple[int, ...]] = set()
        self._seed_counter = itertools.count(1)
        self._thread: int | None = None

    def _check_thread(self) -> None:
        me = threading.get_ident()
        self._thread = self._thread or me
        assert self._thread == me, "FakeEngine called from two threads"

    def _pages_for(self, prompt_len: int, params: SamplingParams) -> int:
        return params.n * -(-(prompt_len + params.max_tokens) // PAGE_SIZE)

    def add_request(self, request_id: str, prompt, params: SamplingParams, *, priority: int = 0) -> None:
        self._check_thread()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids or not all(isinstance(t, int) and 0 <= t < 258 for t in ids):
            raise ValueError("prompt must be non-empty token ids in [0, 258)")
        if any(r.request_id == request_id for r in self.waiting + self.running):
            raise ValueError(f"request_id {request_id!r} is already in use")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, max_model_len is {self.max_model_len}")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(ids))
        if self._pages_for(len(ids), params) > self.num_pages:
            raise ValueError("request needs more pages than the pool has")
        base_seed = params.seed if params.seed is not None else next(self._seed_counter) * 7919
        seqs = [_Seq(j, None if params.greedy else random.Random(base_seed + j),
                     logprobs=[] if params.logprobs is not None else None) for j in range(params.n)]
        prompt_logprobs = (None if params.prompt_logprobs is None
                           else [None] + [self._logprob_entry(t, params.prompt_logprobs) for t in ids[1:]])
        self.waiting.append(_Req(request_id, ids, params, seqs, arrival_time=time.monotonic(),
                                 prompt_logprobs=prompt_logprobs))
        self.num_added += 1

    def abort(self, request_id: str) -> None:
        self._check_thread()
        for queue in (self.waiting, self.running):
            for req in list(queue):
                if req.request_id == request_id:
                    queue.remove(req)
                    self.free_pages += req.pages
                    self.num_aborted += 1

    def warmup(self, variants: str = "all") -> None:
        self._check_thread()
        self.warmup_variants = variants
        time.sleep(self.warmup_delay)
        self.warmed_up = True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            need = self._pages_for(len(req.prompt_ids), req.params)
            if need > self.free_pages:
                return
            self.waiting.pop(0)
            self.free_pages -= need
            req.pages = need
            self.prompt_tokens += len(req.prompt_ids)
            self.prefix_queries += 1
            key = tuple(req.prompt_ids)
            self.prefix_hits += key in self._seen_prompts
            self._seen_prompts.add(key)
            self.running.append(req)

    def _next_token(self, req: _Req, seq: _Seq) -> int:
        body = [t for t in req.prompt_ids if t < 256] or [ord("x")]
        if seq.rng is None:
            return body[len(seq.token_ids) % len(body)]
        return seq.rng.choice(body)

    def _advance(self, req: _Req, seq: _Seq) -> None:
        token = self._next_token(req, seq)
        seq.token_ids.append(token)
        self.generation_tokens += 1
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_entry(token, req.params.logprobs))
        text = self.tokenizer.decode(seq.token_ids)
        for stop in req.params.stop:
            if stop in text:
                seq.text, seq.finish_reason = text[:text.index(stop)], "stop"
                return
        if len(seq.token_ids) >= req.params.max_tokens:
            seq.text, seq.finish_reason = text, "length"
        else:  # hold back a tail that may still become a stop string, as the real detokenizer does
            seq.text = text[:len(text) - _partial_stop_len(text, req.params.stop)]

    def _logprob_entry(self, token: int, k: int) -> dict[int, Logprob]:
        entry = {token: Logprob(-0.5, 1, self.tokenizer.decode([token]))}
        for r in range(1, k + 1):
            alt = (token + r - 1) % 256
            entry.setdefault(alt, Logprob(-0.5 * r, r, self.tokenizer.decode([alt])))
        return entry

    def step(self) -> list[RequestOutput]:
        self._check_thread()
        self._admit()
        if self.fail_on and any(self.fail_on in self.tokenizer.decode(r.prompt_ids) for r in self.running):
            raise RuntimeError(f"fake failure on {self.fail_on!r}")
        if self.stall_on and any(self.stall_on in self.tokenizer.decode(r.prompt_ids) for r in self.running):
            self.stall_on = None
            time.sleep(self.stall_seconds)
        if self.step_delay:
            time.sleep(self.step_delay)
        outputs = []
        for req in list(self.running):
            for seq in req.seqs:
                if seq.finish_reason is None:
                    self._advance(req, seq)
            req.first_token_time = req.first_token_time or time.monotonic()
            finished = all(s.finish_reason for s in req.seqs)
            if finished:
                self.running.remove(req)
                self.free_pages += req.pages
            outputs.append(RequestOutput(
                request_id=req.request_id, prompt=None, prompt_token_ids=list(req.prompt_ids),
                outputs=[CompletionOutput(index=s.index, text=s.text, token_ids=list(s.token_ids),
                                          cumulative_logprob=-0.5 * len(s.token_ids),
                                          logprobs=list(s.logprobs) if s.logprobs is not None else None,
                                          finish_reason=s.finish_reason) for s in req.seqs],
                finished=finished, prompt_logprobs=req.prompt_logprobs, arrival_time=req.arrival_time,
                first_token_time=req.first_token_time))
        return outputs

    def stats(self) -> dict:
        return dict(num_running=len(self.running), num_waiting=len(self.waiting), num_free_pages=self.free_pages,
                    num_used_pages=self.num_pages - self.free_pages, num_total_pages=self.num_pages,
                    prefix_cache_queries=self.prefix_queries, prefix_cache_hits=self.prefix_hits,
                    num_preemptions=0, prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens)


def _partial_stop_len(text: str, stops: list[str]) -> int:
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def main() -> None:
    """Serves the fake engine on loopback: `python -m tests.server.fake_engine --port P`."""
    import argparse

    from jpaged.server import serve
    from jpaged.server.settings import ServerSettings

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--step-delay", type=float, default=0.002)
    parser.add_argument("--num-pages", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    args = parser.parse_args()
    settings = ServerSettings(port=args.port, shutdown_timeout=args.shutdown_timeout)
    serve(None, settings, log_level="warning",
          engine_factory=lambda: FakeEngine(step_delay=args.step_delay, num_pages=args.num_pages,
                                            max_num_seqs=args.max_num_seqs))


if __name__ == "__main__":
    main()
