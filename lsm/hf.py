"""Hugging Face transformers models of lsm: `import lsm.hf` registers the model type "lsm" with the Auto classes.

    import lsm.hf  # noqa: F401  (registers LSMConfig / LSMForCausalLM)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/text_gdn-hf")      # a folder of `lsm export`
    out = model.generate(ids, max_new_tokens=32, do_sample=False)      # greedy, on the recurrent cache

`LSMConfig` carries the full lsm config (`config.lsm`, see lsm.export for config.json's layout);
`LSMForCausalLM.model` is the `lsm.model.LanguageModel` itself, so the weights, the kernels and the
numbers are lsm's. `generate()` (greedy, sampling, any of transformers' logits processors) runs the
prompt once in parallel and then one recurrent step per token: the decode state lives in an
`LSMCache` (a `transformers.Cache` holding the model's own per-block caches — rule and MoM states,
short-conv tails, attention blocks' KV caches), passed back through `cache` / `past_key_values`.
Strategies that rewind or reorder the cache (beam search, assisted decoding) are not supported:
a recurrent state cannot be cropped. Left padding is not supported either: give prompts of one
length (a padded `attention_mask` raises an error).

Tested with transformers 5.24; the range pinned in pyproject (`lsm[hf]`) is fla's.
"""
from __future__ import annotations

from dataclasses import fields

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from lsm.checkpoint import MODEL_TYPE, lsm_config_of
from lsm.config import Config, model_vocab_size
from lsm.model import build_model


class LSMConfig(PretrainedConfig):
    """The lsm config inside a transformers config: `lsm` is the resolved `lsm.config.Config` as a mapping."""

    model_type = MODEL_TYPE

    def __init__(self, lsm: dict | None = None, **kwargs):
        self.lsm = dict(lsm) if lsm is not None else {}
        cfg = self.lsm_config()
        for key in ("vocab_size", "hidden_size", "num_hidden_layers"):  # derived from `lsm`, never set apart from it
            kwargs.pop(key, None)
        kwargs.setdefault("tie_word_embeddings", cfg.model.tie_embeddings)
        self.vocab_size = model_vocab_size(cfg)
        self.hidden_size = cfg.model.hidden_size
        self.num_hidden_layers = cfg.model.num_layers
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Refuse another model's config.json with one clear error (transformers would only warn)."""
        lsm_config_of(config_dict, "config.json")
        return super().from_dict(config_dict, **kwargs)

    def lsm_config(self) -> Config:
        return lsm_config_of({"model_type": MODEL_TYPE, "lsm": self.lsm}, "LSMConfig")


class LSMCache(Cache):
    """The model's per-block decode caches inside a `transformers.Cache`; `seen` counts the tokens they hold.

    Fixed-size for linear mixers (attention blocks' KV caches grow); it cannot be cropped or reordered.
    """

    is_compileable = False

    def __init__(self, caches: list | None = None, seen: int = 0):
        super().__init__(layers=[])
        self.caches = caches
        self.seen = seen

    def get_seq_length(self, layer_idx: int | None = 0, *args, **kwargs) -> int:
        return self.seen

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("LSMCache: a recurrent state cannot be cropped (beam search and assisted "
                                  "decoding are not supported; use greedy or sampling)")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("LSMCache: a recurrent state cannot be reordered (beam search is not supported; "
                                  "use greedy or sampling)")


# transformers 5.24 names the cache `cache` in model outputs and generate; earlier 5.x name it `past_key_values`
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class LSMPreTrainedModel(PreTrainedModel):
    config_class = LSMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _is_stateful = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The LanguageModel initialises itself (rule-specific gate parameters included); nothing to redo here.
        return


class LSMForCausalLM(LSMPreTrainedModel, GenerationMixin):
    """An lsm `LanguageModel` (`self.model`) as a transformers causal LM."""

    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}  # applied when config.tie_word_embeddings

    def __init__(self, config: LSMConfig):
        super().__init__(config)
        self.model = build_model(config.lsm_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own LSMCache

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.head = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                cache: LSMCache | None = None, past_key_values: LSMCache | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids `[B, T]` (new tokens only when a cache is given) -> logits `[B, T, vocab]` (+ loss, cache).

        labels `[B, T]`: next-token loss, shifted inside as transformers models do (-100 is ignored).
        """
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, LSMCache):
            raise TypeError(f"LSMForCausalLM: the cache must be an LSMCache (made by this model), got {type(cache).__name__}")
        if attention_mask is not None and (cache is None or cache.seen == 0) and not bool(attention_mask.all()):
            raise ValueError("LSMForCausalLM: padded prompts (zeros in attention_mask) are not supported by the "
                             "recurrent state; generate prompts of one length (or one prompt at a time)")
        use_cache = bool(use_cache) or cache is not None
        if use_cache and cache is None:
            cache = LSMCache()
        out = self.model(input_ids, caches=None if cache is None or cache.caches is None else cache.caches,
                         use_cache=use_cache)
        if cache is not None:
            cache.caches = out.caches
            cache.seen += input_ids.shape[1]
        loss = None
        if labels is not None:
            from lsm.distributed import token_mean_loss

            shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss = token_mean_loss(out.logits, shifted)[0] + out.aux_loss
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, **{_CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache: LSMCache | None = None,
                                      past_key_values: LSMCache | None = None, attention_mask: Tensor | None = None,
                                      use_cache: bool = True, **kwargs) -> dict:
        """The tokens the cache has not seen yet (all of the prompt first, then one per step) and the cache."""
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.seen:
            input_ids = input_ids[:, cache.seen:]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask, "use_cache": use_cache}


def register() -> None:
    """Register "lsm" with transformers' Auto classes (idempotent; done on `import lsm.hf`)."""
    try:
        AutoConfig.register(MODEL_TYPE, LSMConfig)
    except ValueError:  # already registered by an earlier import
        pass
    try:
        AutoModelForCausalLM.register(LSMConfig, LSMForCausalLM)
    except ValueError:
        pass


register()

__all__ = ["LSMCache", "LSMConfig", "LSMForCausalLM", "register"]
