"""Scoring many continuations after one shared prefix, reading the prefix once.

vLLM recomputes the whole prompt for every `prompt_logprobs` request (its prefix cache is bypassed for
them; measured: same time with caching on or off), so k follow-ups after one context cost k full passes.
Here the prefix runs once through the model, its KV cache is repeated k times, and all k continuations
run as one batch against it: cost ≈ one prefix pass + the continuation tokens.

`NaiveScorer` is the reference: one full vLLM `prompt_logprobs` request per (prefix, continuation).
"""

from __future__ import annotations

from typing import Sequence

from prefmill.serving.models import resolve_model
from prefmill.serving.protocols import Conversation, Message, ScoredPrefix
from prefmill.serving.render import ScoringPrompt, hf_render, hf_tokenize, scoring_prompts, truncate_left


class SharedPrefixScorer:
    """A `ContinuationScorer` on transformers with KV-cache reuse (float32 on CPU, bf16 on GPU).

    `prefix_batch` prefixes go through one forward (right-padded, with a mask and explicit positions), then
    all their `prefix_batch × k` continuations through one more on the repeated caches, so a GPU gets full
    batches; prefixes are grouped by length to keep padding small. Peak memory grows with
    `prefix_batch × k` continuation rows (their logits are rows × longest continuation × vocabulary).
    """

    def __init__(self, model: str = "smollm2-135m", device: str | None = None, share_prefix: bool = True,
                 prefix_batch: int = 8, loaded: tuple | None = None):
        """`loaded`: a transformers (model, tokenizer) built already (bench/gpu_check.py's randomly initialised
        ones) instead of loading the spec `model`, which then only names it."""
        import torch

        if prefix_batch < 1:
            raise ValueError(f"prefix_batch must be at least 1, got {prefix_batch}")
        self.name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        hf_model, self.tokenizer = loaded or _load(model, dtype)
        self.model = hf_model.to(device=self.device, dtype=dtype).eval()
        self.share_prefix = share_prefix
        self.prefix_batch = prefix_batch
        self.max_tokens = int(getattr(self.model.config, "max_position_embeddings", 4096))

    def score_continuations(self, prefixes: Sequence[Conversation], continuations: Sequence[Message],
                            max_tokens: int | None = None) -> list[ScoredPrefix]:
        limit = min(max_tokens or self.max_tokens, self.max_tokens)
        if not continuations:
            return [ScoredPrefix([], 0) for _ in prefixes]
        conts, shared = self._token_ids(prefixes, continuations, limit)
        if not self.share_prefix:
            return [ScoredPrefix([self._batch_pass([ids], [c])[0][0] for c in conts], cut) for ids, cut in shared]
        # group prefixes of similar length so a batch carries little padding; results go back in input order
        order = sorted(range(len(shared)), key=lambda i: len(shared[i][0]))
        scores: dict[int, list[list[float]]] = {}
        for start in range(0, len(order), self.prefix_batch):
            group = order[start:start + self.prefix_batch]
            scores.update(zip(group, self._batch_pass([shared[i][0] for i in group], conts)))
        return [ScoredPrefix(scores[i], cut) for i, (_ids, cut) in enumerate(shared)]

    def _token_ids(self, prefixes: Sequence[Conversation], continuations: Sequence[Message],
                   limit: int) -> tuple[list[list[int]], list[tuple[list[int], int]]]:
        """The continuations' ids, and each prefix's ids cut from the left to fit `limit`, with the cut."""
        render, tokenize = hf_render(self.tokenizer), hf_tokenize(self.tokenizer)
        # every continuation follows the prefix rendered for the first one's role (all follow-ups share a role)
        prompts = scoring_prompts(render, tokenize, prefixes, [continuations[0]] * len(prefixes))
        conts = [tokenize(c["content"]) for c in continuations]
        longest = max(len(c) for c in conts)
        return conts, [truncate_left(p.prefix_ids, longest, limit) for p in prompts]

    def _batch_pass(self, prefixes: list[list[int]], conts: list[list[int]]) -> list[list[list[float]]]:
        """Per prefix, the logprobs of every continuation: one forward over the right-padded prefixes, then
        one over all prefixes × continuations on the repeated caches."""
        import torch

        if not conts:
            return [[] for _ in prefixes]
        lengths = torch.tensor([len(p) for p in prefixes], device=self.device)
        ids, prefix_mask = self._pad(prefixes)
        with torch.inference_mode():
            # the logits of each prefix's last real position only (not prefixes × length × vocabulary)
            last = torch.unique(lengths - 1)
            out = self.model(input_ids=ids, attention_mask=prefix_mask, position_ids=_arange_rows(prefix_mask),
                             logits_to_keep=last, use_cache=True)
            rows = torch.arange(len(prefixes), device=self.device)
            first = out.logits[rows, torch.searchsorted(last, lengths - 1)].float().log_softmax(-1)
            width = max((len(c) for c in conts), default=0)
            if width <= 1:
                return [[[row[c[0]].item()] if c else [] for c in conts] for row in first]
            rest = self._continuation_pass(out.past_key_values, prefix_mask, lengths, conts, width)
        k = len(conts)
        return [[_gather(first[b], rest[b * k + j], c) for j, c in enumerate(conts)] for b in range(len(prefixes))]

    def _continuation_pass(self, cache, prefix_mask, lengths, conts: list[list[int]], width: int):
        """Logits at continuation positions 0..width-2 for every (prefix, continuation) row, prefix-major:
        each continuation token sits right after its own prefix's last real token (position = its length)."""
        import torch

        k = len(conts)
        batch, mask = self._pad(conts)
        cache.batch_repeat_interleave(k)
        attention = torch.cat([prefix_mask.repeat_interleave(k, dim=0), mask.repeat(len(lengths), 1)], dim=1)
        positions = lengths.repeat_interleave(k)[:, None] + torch.arange(width - 1, device=self.device)
        logits = self.model(input_ids=batch[:, :-1].repeat(len(lengths), 1), past_key_values=cache,
                            attention_mask=attention[:, :-1], position_ids=positions, use_cache=True).logits
        return logits

    def _pad(self, seqs: list[list[int]]):
        """Right-padded ids and their attention mask."""
        import torch

        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        batch = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
        return batch, mask


def _load(spec: str, dtype) -> tuple:
    """The transformers model and tokenizer of a model spec."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def _arange_rows(mask):
    """Position ids of right-padded rows: 0, 1, … (the real tokens come first, padding is masked)."""
    import torch

    return torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)


def _gather(first, logits, ids: list[int]) -> list[float]:
    """logprob of ids[0] from the prefix's last position, of ids[j] from continuation position j-1; the
    log-softmax runs one row at a time so the float copy stays one continuation's size."""
    if not ids:
        return []
    rest = logits[:len(ids) - 1].float().log_softmax(-1)
    return [first[ids[0]].item()] + [rest[j - 1, t].item() for j, t in enumerate(ids) if j > 0]


class NaiveScorer:
    """A `ContinuationScorer` that sends every (prefix, continuation) as its own vLLM request."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.name

    def score_continuations(self, prefixes: Sequence[Conversation], continuations: Sequence[Message],
                            max_tokens: int | None = None) -> list[ScoredPrefix]:
        # a scoring prompt must stay below the context window (vLLM generates one token after it)
        limit = min(max_tokens or self.engine.config.max_model_len, self.engine.config.max_model_len - 1)
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
