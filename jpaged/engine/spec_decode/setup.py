"""Builds the engine's Speculator from EngineConfig.speculative_config (None when it is off)."""
from __future__ import annotations

from jpaged.engine.spec_decode.config import SpeculativeConfig
from jpaged.engine.spec_decode.speculator import Speculator


def load_draft(config, model, tokenizer, draft=None):
    """The draft model of speculative_config (None for n-gram or no speculation), its tokenizer checked
    against the target's. `draft`: (model, tokenizer) to use instead of loading speculative_config's
    model; the target itself gives a self-draft sharing its weights."""
    spec: SpeculativeConfig | None = config.speculative_config
    if spec is None or spec.method != "draft_model":
        if draft is not None:
            raise ValueError("a draft model was given, but speculative_config's method is not 'draft_model'")
        return None
    if config.tensor_parallel_size > 1:
        raise ValueError("speculative_config method 'draft_model' is not supported with tensor_parallel_size > 1")
    from jpaged.engine.spec_decode import draft_model

    if draft is None:
        from jpaged.loader import load_model
        draft = load_model(spec.model, dtype=config.dtype)
    net, draft_tokenizer = draft
    if net is model or spec.draft_num_layers is not None:  # a view of the weights, never a copy
        net = draft_model.truncated(net, spec.draft_num_layers or net.config.num_layers)
    draft_model.check_tokenizers(tokenizer, draft_tokenizer, model.config.vocab_size, net.config.vocab_size)
    return net


def make_speculator(config, draft_net=None, *, num_pages: int, max_model_len: int) -> Speculator | None:
    spec: SpeculativeConfig | None = config.speculative_config
    if spec is None:
        return None
    if spec.method == "ngram":
        return Speculator(spec)
    from jpaged.engine.spec_decode.draft_model import DraftProposer

    return Speculator(spec, draft=DraftProposer(config, draft_net, num_pages=num_pages, max_model_len=max_model_len))
