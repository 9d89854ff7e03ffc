"""LLM: the offline facade over Engine (vLLM's names): generate() and chat() over a batch of prompts."""
from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Sequence

from tqdm.auto import tqdm

from jpaged.config import EngineConfig
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "default", *, model_obj=None, tokenizer=None, **engine_args):
        """engine_args are EngineConfig fields (dtype, default "auto": bfloat16 on a GPU, float32 on CPU;
        block_size, max_num_seqs, ...)."""
        from jpaged.engine.data_parallel import make_engine
        self.engine = make_engine(EngineConfig(model=model, **engine_args), model=model_obj, tokenizer=tokenizer)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool | None = None, lora_request=None) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs in the order of `prompts`. A progress bar shows
        with use_tqdm=True, or by default when stderr is a terminal. `lora_request`: a
        jpaged.lora.LoRARequest for every prompt, or a list of one per prompt (None: the base model);
        it needs enable_lora=True."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        loras = lora_request if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"lora_request has {len(loras)} entries for {len(prompts)} prompts")
        order = {}
        added = []
        final_only: dict[int, SamplingParams] = {}
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                rid = f"llm-{next(self._ids)}"
                # Only finished outputs are returned: the engine then skips per-token reports and text.
                # One final_only copy per distinct params object (the sampler groups rows by object).
                if id(p) not in final_only:
                    final_only[id(p)] = dataclasses.replace(p or SamplingParams(), output_kind="final_only")
                self.engine.add_request(rid, prompt, final_only[id(p)],
                                        **({} if lora is None else {"lora_request": lora}))
                order[rid] = len(order)
                added.append(rid)
        except ValueError:
            for rid in added:
                self.engine.abort(rid)
            raise
        return self._run(order, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, *, use_tqdm: bool | None = None,
             lora_request=None) -> list[RequestOutput]:
        """`messages`: one conversation (a list of {"role", "content"}) or a list of conversations;
        `lora_request` as in generate()."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.chat_prompt_ids(c) for c in conversations], sampling_params, use_tqdm=use_tqdm,
                             lora_request=lora_request)

    def chat_prompt_ids(self, conversation: list[dict]) -> list[int]:
        """Token ids of the chat template around a conversation (the template holds the special tokens)."""
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _run(self, order: dict[str, int], use_tqdm: bool | None) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        if use_tqdm is None:
            use_tqdm = sys.stderr.isatty()
        bar = tqdm(total=len(order), desc="Generating", disable=not use_tqdm, dynamic_ncols=True)
        prompt_tokens, gen_tokens = self.engine.prompt_tokens_total, self.engine.generation_tokens_total
        remaining = len(order)
        with bar:
            while remaining:
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        remaining -= 1
                        bar.update(1)
                rate = bar.format_dict.get("elapsed") or 1e-9
                bar.set_postfix(prefill_tok_s=int((self.engine.prompt_tokens_total - prompt_tokens) / rate),
                                decode_tok_s=int((self.engine.generation_tokens_total - gen_tokens) / rate),
                                refresh=False)
        return results
