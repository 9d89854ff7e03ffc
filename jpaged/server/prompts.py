"""API prompts to token ids, on the server's own threads and with the cheap checks first.

Tokenizing, chat templating and decoding run on a small thread pool, never on the engine thread
(where a big prompt would stall every stream) nor on the event loop. Before any of that, a text
whose byte length alone proves it cannot fit (each token covers at most `max_token_bytes` bytes)
and token ids outside the vocabulary are refused with a 400 naming the offending value.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Sequence

from jpaged.server.protocol import ApiError


def longest_token_bytes(tokenizer, vocab_size: int) -> int:
    """The most UTF-8 bytes any one token decodes to (special tokens included), at least 1."""
    decode = tokenizer.decode
    return max([1] + [len(decode([i], skip_special_tokens=False).encode("utf-8")) for i in range(vocab_size)])


def vocab_size_of(engine) -> int:
    """Token ids the model accepts: its embedding rows, else the tokenizer's vocabulary."""
    model = getattr(engine, "model", None)
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None) or getattr(engine.tokenizer, "vocab_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError("the engine's model or tokenizer must report a positive vocab_size")
    return size


class PromptPreparer:
    """Checks and tokenizes the prompts of one server's requests.

    Args:
      tokenizer: encode / decode / apply_chat_template (encode_batch when it has one, which frees the GIL).
      vocab_size: token ids must lie in [0, vocab_size).
      max_model_len: the longest prompt + completion.
      max_token_bytes: the most bytes one token covers (`longest_token_bytes`).
    """

    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int, max_token_bytes: int, workers: int = 4):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_token_bytes = max_token_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jpaged-tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _off_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- cheap checks (on the event loop, before any tokenization) ----------------------------------

    def check_text_fits(self, num_bytes: int, param: str) -> None:
        """400 when `num_bytes` of text must make more tokens than the context holds."""
        if num_bytes // self.max_token_bytes >= self.max_model_len:
            raise ApiError(400, f"the prompt is {num_bytes} bytes, at least {num_bytes // self.max_token_bytes} "
                           f"tokens; this model's maximum context length is {self.max_model_len} tokens",
                           param=param, code="context_length_exceeded")

    def check_token_ids(self, prompts: Sequence[str | list[int]], param: str) -> None:
        """400 naming the first id outside [0, vocab_size), or the first id list that cannot fit."""
        nested = len(prompts) > 1
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                continue
            if len(prompt) >= self.max_model_len:
                where = f"{param}[{i}]" if nested else param
                raise ApiError(400, f"'{where}' has {len(prompt)} tokens; this model's maximum context length "
                               f"is {self.max_model_len} tokens, which leaves no room to generate",
                               param=param, code="context_length_exceeded")
            for j, t in enumerate(prompt):
                if not 0 <= t < self.vocab_size:
                    where = f"{param}[{i}][{j}]" if nested else f"{param}[{j}]"
                    raise ApiError(400, f"'{where}' is {t}, outside this model's token ids [0, "
                                   f"{self.vocab_size})", param=param, code="invalid_token_id")

    # -- the work (on the pool) ---------------------------------------------------------------------

    async def token_ids(self, prompts: Sequence[str | list[int]], *, add_special_tokens: bool,
                        param: str) -> list[list[int]]:
        """Each prompt as token ids; texts are tokenized together on the pool."""
        self.check_token_ids(prompts, param)
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            self.check_text_fits(len(text.encode("utf-8")), param)
        encoded = iter(await self._off_thread(self._encode, texts, add_special_tokens) if texts else [])
        return [next(encoded) if isinstance(p, str) else list(p) for p in prompts]

    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        batch = getattr(self.tokenizer, "encode_batch", None)
        if batch is not None:
            return batch(texts, add_special_tokens=add_special_tokens)
        return [self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    async def decode(self, token_ids: list[int]) -> str:
        return await self._off_thread(lambda: self.tokenizer.decode(token_ids, skip_special_tokens=False))

    async def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None,
                          add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the model's chat template (400 when it has none or rejects it).
        `tools` go to the template's `tools=`, or in for a template without tools (jpaged/server/tools.py)."""
        self.check_text_fits(sum(len(m["content"].encode("utf-8")) for m in messages), "messages")
        extra = {}
        if tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            from jpaged.server import tools as tool_calling
            if tool_calling.template_mentions_tools(getattr(self.tokenizer, "chat_template", None)):
                extra = {"tools": tools} if tools is not None else {}
            else:
                messages = tool_calling.plain_history(messages, tools)
        try:
            return await self._off_thread(lambda: self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, **extra))
        except Exception as e:  # no template, or one that rejects the conversation (roles out of order)
            message = str(e) if isinstance(e, ValueError) else f"the chat template rejected 'messages': {e}"
            raise ApiError(400, message, param="messages", code="invalid_messages") from None

    def check_lengths(self, token_ids: list[list[int]], max_tokens: int | None, param: str) -> None:
        """400 when a tokenized prompt, with its max_tokens, does not fit the context."""
        limit = self.max_model_len
        for i, ids in enumerate(token_ids):
            which = f"prompt {i} " if len(token_ids) > 1 else "the prompt "
            if len(ids) >= limit:
                raise ApiError(400, f"{which}has {len(ids)} tokens; this model's maximum context length is "
                               f"{limit} tokens, which leaves no room to generate", param=param,
                               code="context_length_exceeded")
            if max_tokens is not None and len(ids) + max_tokens > limit:
                raise ApiError(400, f"this model's maximum context length is {limit} tokens, but "
                               f"{len(ids) + max_tokens} were requested ({len(ids)} in {which.strip()}, "
                               f"{max_tokens} in max_tokens)", param=param, code="context_length_exceeded")
