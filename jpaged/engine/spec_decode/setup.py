"""Builds the engine's Speculator from EngineConfig.speculative_config (None when it is off)."""
from __future__ import annotations


from jpaged.engine.spec_decode.config import SpeculativeConfig
from jpaged.engine.spec_decode.speculator import Speculator


def make_speculator(config, model, tokenizer, *, draft=None, num_pages: int, max_model_len: int):
    """`draft`: (model, tokenizer) to use instead of loading speculative_config's model."""
    spec: SpeculativeConfig | None = config.speculative_config
    if spec is None:
        if draft is not None:
            raise ValueError("a draft model was given without speculative_config")
        return None
    if config.data_parallel_size > 1:
        raise ValueError("speculative_config is not supported with data_parallel_size > 1")
    if spec.method == "ngram":
        if draft is not None:
            raise ValueError("a draft model was given, but speculative_config's method is 'ngram'")
        return Speculator(spec)
    from jpaged.engine.spec_decode import draft_model

    if draft is None:
        from jpaged.loader import load_model
        draft = load_model(spec.model, dtype=config.dtype)
    draft_net, draft_tokenizer = draft
    if draft_net is model:  # self-drafting: a view of the same weights
        draft_net = draft_model.truncated(model, spec.draft_num_layers or model.config.num_layers)
    elif spec.draft_num_layers is not None:
        draft_net = draft_model.truncated(draft_net, spec.draft_num_layers)
    draft_model.check_tokenizers(tokenizer, draft_tokenizer, model.config.vocab_size, draft_net.config.vocab_size)
    proposer = draft_model.DraftProposer(config, draft_net, num_pages=num_pages, max_model_len=max_model_len)
    return Speculator(spec, draft=proposer)
