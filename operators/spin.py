"""Gold-vs-own pairs (SPIN, Chen et al. 2024): the seed's `reference_answer` is chosen over the policy's own
reply to the same question (sampled at temperature 1.0 by default). A reply equal to the gold answer after
normalisation, an empty or truncated one, or a question too long for the model's context is a reject row, not
a pair.
Iteration t's policy makes iteration t's rejected side; the pairs record `iteration` and the policy's identity,
so earlier iterations' generations can be mixed in by SQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefmill.operators.ids import stable_id
from prefmill.operators.reasoning import GOLD_SCORES, Pairs
from prefmill.operators.verify import normalised
from prefmill.schemas.config import SPINSection
from prefmill.serving.protocols import PROMPT_TOO_LONG, Completion, LanguageModel, Sampling

_DEFAULTS = SPINSection()  # the config section holds every default: one definition


@dataclass(frozen=True)
class SelfPlay:
    """`__call__(seeds, lm)` → `Pairs`: one own reply per seed with a reference answer, against that answer."""

    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    max_tokens: int = _DEFAULTS.max_tokens
    seed: int = _DEFAULTS.seed

    def __call__(self, seeds: list[dict], lm: LanguageModel) -> Pairs:
        sampling = Sampling(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                            seed=self.seed)
        outs = lm.chat([question(s) for s in seeds], sampling) if seeds else []
        pairs, rejects = [], []
        for seed, samples in zip(seeds, outs):
            problem = self._problem(seed, samples[0])
            if problem:
                rejects.append(self._reject(seed, problem, lm.name))
            else:
                pairs.append(self._pair(seed, samples[0], lm.name))
        return Pairs.of(pairs, rejects)

    @staticmethod
    def _problem(seed: dict, sample: Completion) -> tuple[str, str] | None:
        if sample.finish_reason == PROMPT_TOO_LONG:
            return PROMPT_TOO_LONG, "the question does not fit the model's context window with spin.max_tokens"
        if not sample.text.strip():
            return "empty_reply", "the policy's reply is empty"
        if sample.finish_reason == "length":
            return "truncated", "the policy's reply was cut at spin.max_tokens: raise it to compare whole replies"
        if normalised(sample.text) == normalised(seed["reference_answer"]):
            return "gold_equal", "the policy's reply equals the reference answer after normalisation"
        return None

    def _sample_id(self, seed: dict, model: str) -> str:
        return stable_id("spin", seed["seed_id"], self.seed, model)

    def _pair(self, seed: dict, sample: Completion, model: str) -> dict:
        prompt = question(seed)
        return {"pair_id": stable_id("pair", "spin", seed["seed_id"], seed["reference_answer"], sample.text),
                "prompt_id": stable_id("prompt", prompt), "prompt": prompt,
                "chosen": [{"role": "assistant", "content": seed["reference_answer"]}],
                "rejected": [{"role": "assistant", "content": sample.text}],
                "rejected_candidate_id": self._sample_id(seed, model), "seed_id": seed["seed_id"],
                "policy_model": model, "source": "spin", **GOLD_SCORES}

    def _reject(self, seed: dict, problem: tuple[str, str], model: str) -> dict:
        return {"prompt_id": stable_id("prompt", question(seed)), "candidate_id": self._sample_id(seed, model),
                "seed_id": seed["seed_id"], "reason": problem[0], "detail": problem[1], "source": "spin"}


def question(seed: dict) -> list[dict]:
    """The seed's question as one user turn: the prompt the reference answer answers."""
    return [{"role": "user", "content": seed["question"]}]
