"""Verifier-graded reasoning pairs (IRPO, Pang et al. 2024): N chain-of-thought solutions per question, each
final answer checked against the seed's gold `final_answer`; a correct solution is chosen over a wrong one.

Every solution is kept in the `solutions` table with its extracted answer, `is_correct` and the verifier's
reason. A question gives up to `max_pairs` pairs, each distinct solution text in at most one (so no two pairs of a
question share a side; a repeated text is a `duplicate_solution` row); one whose answered solutions are all
correct or all wrong gives a reject row (`all_correct` / `all_wrong`), and a solution without an answer that
parses is a `no_answer` row. IRPO trains with DPO plus an
NLL term on the chosen side (TRL's `rpo_alpha`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from prefmill.operators.dedup import normalise
from prefmill.operators.ids import stable_id
from prefmill.operators.verify import verify
from prefmill.schemas.config import IRPOSection
from prefmill.schemas.tables import PAIR_REJECTS, PAIRS, SOLUTIONS
from prefmill.serving.protocols import Completion, Conversation, LanguageModel, Sampling

_DEFAULTS = IRPOSection()  # the config section holds every default: one definition
# a gold-anchored pair's scores: the verifier's (or the gold answer's) 1 against 0, so margin-ordered steps
# (dedup keeps the larger margin) treat every such pair alike
GOLD_SCORES = {"score_chosen": 1.0, "score_rejected": 0.0, "margin": 1.0}


def solve_prompt(seed: dict, instruction: str = _DEFAULTS.instruction) -> Conversation:
    """The question as one user turn, with the instruction that asks for a parseable final line."""
    return [{"role": "user", "content": f"{seed['question']}\n\n{instruction}"}]


@dataclass(frozen=True)
class SolutionSampler:
    """`__call__(seeds, lm)` → a `solutions` table: `samples` verified solutions per seed with a final_answer."""

    samples: int = _DEFAULTS.samples
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    max_tokens: int = _DEFAULTS.max_tokens
    seed: int = _DEFAULTS.seed
    instruction: str = _DEFAULTS.instruction
    numeric_tolerance: float = _DEFAULTS.numeric_tolerance

    def __call__(self, seeds: list[dict], lm: LanguageModel) -> pa.Table:
        sampling = Sampling(n=self.samples, temperature=self.temperature, top_p=self.top_p,
                            max_tokens=self.max_tokens, seed=self.seed)
        prompts = [solve_prompt(s, self.instruction) for s in seeds]
        replies = lm.chat(prompts, sampling) if seeds else []
        rows = [self._row(seed, prompt, k, out, lm.name) for seed, prompt, outs in zip(seeds, prompts, replies)
                for k, out in enumerate(outs)]
        return pa.Table.from_pylist(rows, schema=SOLUTIONS)

    def _row(self, seed: dict, prompt: Conversation, k: int, out: Completion, model: str) -> dict:
        verdict = verify(out.text, seed["final_answer"], seed["answer_type"], self.numeric_tolerance,
                         truncated=out.finish_reason == "length")
        return {"solution_id": stable_id("sol", seed["seed_id"], self.instruction, self.seed + k, model, out.text),
                "seed_id": seed["seed_id"], "prompt": prompt, "solution": out.text, "sample_index": k,
                "sampling_seed": self.seed + k, "num_tokens": out.num_tokens, "finish_reason": out.finish_reason,
                "answer": verdict.answer, "is_correct": verdict.is_correct, "verify_reason": verdict.reason,
                "final_answer": seed["final_answer"], "answer_type": seed["answer_type"], "model": model}


@dataclass(frozen=True)
class Pairs:
    """A source's pairs and reject rows (PAIRS and PAIR_REJECTS tables)."""

    pairs: pa.Table
    rejects: pa.Table

    @classmethod
    def of(cls, pairs: list[dict], rejects: list[dict]) -> Pairs:
        return cls(pa.Table.from_pylist(pairs, schema=PAIRS), pa.Table.from_pylist(rejects, schema=PAIR_REJECTS))


def pass_rate(solutions: list[dict]) -> float:
    """The share of a question's solutions whose final answer verifies."""
    return sum(s["is_correct"] is True for s in solutions) / len(solutions)


def by_seed(solutions: pa.Table) -> dict[str, list[dict]]:
    """Solutions grouped by question, in sample order."""
    groups: dict[str, list[dict]] = {}
    for row in sorted(solutions.to_pylist(), key=lambda r: (r["seed_id"], r["sample_index"])):
        groups.setdefault(row["seed_id"], []).append(row)
    return groups


@dataclass(frozen=True)
class IRPOPairs:
    """`__call__(solutions)` → `Pairs`: correct vs wrong solutions of each question."""

    max_pairs: int = _DEFAULTS.max_pairs

    def __call__(self, solutions: pa.Table) -> Pairs:
        pairs: list[dict] = []
        rejects: list[dict] = []
        for group in by_seed(solutions).values():
            pairs += self._question(group, rejects)
        return Pairs.of(pairs, rejects)

    def _question(self, group: list[dict], rejects: list[dict]) -> list[dict]:
        rate = pass_rate(group)
        rejects += [solution_reject(s, "no_answer", s["verify_reason"], rate) for s in group
                    if s["is_correct"] is None]
        answered = _distinct([s for s in group if s["is_correct"] is not None], rate, rejects)
        correct = [s for s in answered if s["is_correct"]]
        wrong = [s for s in answered if not s["is_correct"]]
        if not correct or not wrong:
            rejects.append(question_reject(group, *_uniform(correct, wrong, len(group)), rate))
            return []
        return [self._pair(c, w, rate) for c, w in list(zip(correct, wrong))[: self.max_pairs]]

    @staticmethod
    def _pair(chosen: dict, rejected: dict, rate: float) -> dict:
        return {"pair_id": stable_id("pair", "irpo", chosen["solution_id"], rejected["solution_id"]),
                "prompt_id": stable_id("prompt", chosen["prompt"]), "prompt": chosen["prompt"],
                "chosen": [{"role": "assistant", "content": chosen["solution"]}],
                "rejected": [{"role": "assistant", "content": rejected["solution"]}],
                "chosen_candidate_id": chosen["solution_id"], "rejected_candidate_id": rejected["solution_id"],
                "seed_id": chosen["seed_id"], "policy_model": chosen["model"], "source": "irpo",
                "pass_rate": rate, "chosen_is_correct": True, "rejected_is_correct": False,
                "chosen_answer": chosen["answer"], "rejected_answer": rejected["answer"],
                "gold_answer": chosen["final_answer"], **GOLD_SCORES}


def _distinct(solutions: list[dict], rate: float, rejects: list[dict]) -> list[dict]:
    """One solution per text (white space and case folded); later copies become reject rows."""
    first: dict[str, dict] = {}
    for s in solutions:
        key = normalise(s["solution"])
        if key in first:
            rejects.append(solution_reject(s, "duplicate_solution", f"same text as {first[key]['solution_id']}", rate))
        else:
            first[key] = s
    return list(first.values())


def _uniform(correct: list[dict], wrong: list[dict], n: int) -> tuple[str, str]:
    """Why a question gives no pair: its answered solutions are all correct, all wrong, or there are none."""
    if correct:
        return "all_correct", f"all {len(correct)} answered solutions verify (of {n}): nothing to reject"
    if wrong:
        return "all_wrong", f"none of the {len(wrong)} answered solutions verifies (of {n}): nothing to choose"
    return "no_answer", f"none of the {n} solutions has a final answer that parses"


def solution_reject(solution: dict, reason: str, detail: str, rate: float | None, source: str = "irpo") -> dict:
    return {"prompt_id": stable_id("prompt", solution["prompt"]), "candidate_id": solution["solution_id"],
            "seed_id": solution["seed_id"], "reason": reason, "detail": detail, "source": source,
            "pass_rate": rate}


def question_reject(group: list[dict], reason: str, detail: str, rate: float, source: str = "irpo") -> dict:
    return {"prompt_id": stable_id("prompt", group[0]["prompt"]), "seed_id": group[0]["seed_id"],
            "reason": reason, "detail": detail, "num_candidates": len(group), "source": source, "pass_rate": rate}
