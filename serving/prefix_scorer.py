"""Scoring many continuations after one shared prefix, reading the prefix once.

vLLM recomputes the whole prompt for every `prompt_logprobs` request (its prefix cache is bypassed for
them; measured: same time with caching on or off), so k follow-ups after one context cost k full passes.
Here the prefix runs once through the model, its KV cache is repeated k times, and all k continuations
run as one batch against it: cost ≈ one prefix pass + the continuation tokens.

`NaiveScorer` is the reference: one full vLLM `prompt_logprobs` request per (prefix, continuation).
"""

from __future__ import annotations

from typing import Sequence

from serving.models import resolve_model
from serving.protocols import Conversation, Message, ScoredPrefix
from serving.render import ScoringPrompt, hf_render, hf_tokenize, scoring_prompts, truncate_left


class SharedPrefixScorer:
    """A `ContinuationScorer` on transformers with KV-cache reuse (float32 on CPU, bf16 on GPU)."""

    def __init__(self, model: str = "smollm2-135m", device: str | None = None, share_prefix: bool = True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.share_prefix = share_prefix
        self.max_tokens = int(getattr(self.model.config, "max_position_embeddings", 4096))

    def score_continuations(self, prefixes: Sequence[Conversation], continuations: Sequence[Message],
                            max_tokens: int | None = None) -> list[ScoredPrefix]:
        limit = min(max_tokens or self.max_tokens, self.max_tokens)
        return [self._score_one(prefix, continuations, limit) for prefix in prefixes]

    def _score_one(self, prefix: Conversation, continuations: Sequence[Message], limit: int) -> ScoredPrefix:
        prompts = scoring_prompts(hf_render(self.tokenizer), hf_tokenize(self.tokenizer),
                                  [prefix] * len(continuations), continuations)
        shared, cut = truncate_left(prompts[0].prefix_ids, max(len(p.continuation_ids) for p in prompts), limit)
        conts = [p.continuation_ids for p in prompts]
        if self.share_prefix:
            return ScoredPrefix(self._shared_pass(shared, conts), cut)
        return ScoredPrefix([self._shared_pass(shared, [c])[0] for c in conts], cut)

    def _shared_pass(self, prefix_ids: list[int], conts: list[list[int]]) -> list[list[float]]:
        """One forward over the prefix, then one batched forward of all continuations on its cache."""
        import torch

        with torch.inference_mode():
            ids = torch.tensor([prefix_ids], device=self.device)
            out = self.model(input_ids=ids, use_cache=True)
            first = out.logits[0, -1].float().log_softmax(-1)
            width = max((len(c) for c in conts), default=0)
            if width <= 1:
                return [[first[c[0]].item()] if c else [] for c in conts]
            batch, mask = self._pad(conts, width)
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(conts))
            attention = torch.cat([torch.ones(len(conts), len(prefix_ids), dtype=mask.dtype, device=self.device),
                                   mask], dim=1)
            positions = torch.arange(len(prefix_ids), len(prefix_ids) + width, device=self.device)
            logits = self.model(input_ids=batch[:, :-1], past_key_values=cache, attention_mask=attention[:, :-1],
                                position_ids=positions[:-1].expand(len(conts), -1), use_cache=True).logits
            rest = logits.float().log_softmax(-1)
        return [_gather(first, rest[b], c) for b, c in enumerate(conts)]

    def _pad(self, conts: list[list[int]], width: int):
        import torch

        pad = self.tokenizer.pad_token_id or 0
        batch = torch.tensor([c + [pad] * (width - len(c)) for c in conts], device=self.device)
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in conts], device=self.device)
        return batch, mask


def _gather(first, rest, ids: list[int]) -> list[float]:
    """logprob of ids[0] from the prefix's last position, of ids[j] from continuation position j-1."""
    if not ids:
        return []
    return [first[ids[0]].item()] + [rest[j - 1, t].item() for j, t in enumerate(ids) if j > 0]


class NaiveScorer:
    """A `ContinuationScorer` that sends every (prefix, continuation) as its own vLLM request."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.name

    def score_continuations(self, prefixes: Sequence[Conversation], continuations: Sequence[Message],
                            max_tokens: int | None = None) -> list[ScoredPrefix]:
        limit = max_tokens or self.engine.config.max_model_len
        k = len(continuations)
        prompts = self.engine.scoring_prompts([p for p in prefixes for _ in range(k)],
                                              list(continuations) * len(prefixes))
        flat, cuts = [], []
        for start in range(0, len(prompts), k):
            group = prompts[start:start + k]
            shared, cut = truncate_left(group[0].prefix_ids, max(len(p.continuation_ids) for p in group), limit)
            flat += [ScoringPrompt(shared, p.continuation_ids) for p in group]
            cuts.append(cut)
        scores = self.engine.score_token_ids(flat)
        return [ScoredPrefix(scores[i * k:(i + 1) * k], cut) for i, cut in enumerate(cuts)]
