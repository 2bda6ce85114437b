"""First-wrong-step pairs (Step-DPO, Lai et al. 2024) from the wrong solutions IRPO sampled.

A solution's steps are its non-empty lines. The first wrong step is located without a judge by rollouts
(Math-Shepherd style): from the prefix ending at each step, `rollouts` continuations are sampled and checked by
the verifier (every prefix within the budget, in one batch); the first step after which at most `wrong_rate`
of them reach the gold answer is the wrong one (the last step is, when every probed prefix still succeeds: it
gives the wrong answer). With `locator = judge`
a judge model given the seed's `gold_solution` names the step instead. Rectification resamples from the prefix
before that step with the same model and keeps a continuation whose final answer verifies. Pair: prompt = the
question + the correct prefix (an assistant turn that training continues), chosen = the rectified step,
rejected = the wrong step. A solution whose step cannot be located or rectified is a reject row with why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa

from prefmill.operators.ids import stable_id
from prefmill.operators.reasoning import GOLD_SCORES, Pairs, by_seed, pass_rate, solution_reject
from prefmill.operators.verify import final_answer, verify
from prefmill.schemas.config import IRPOSection, StepDPOSection
from prefmill.serving.protocols import Conversation, LanguageModel, Sampling

_DEFAULTS = StepDPOSection()  # the config section holds every default: one definition
RECTIFY_SEED_OFFSET = 100_003  # rectifications sample with other seeds than the rollouts of the same prefix


def split_steps(solution: str) -> list[str]:
    """A solution's steps: its non-empty lines, right-stripped."""
    return [line.rstrip() for line in solution.splitlines() if line.strip()]


def continued(prompt: Conversation, steps: list[str], j: int) -> Conversation:
    """The solve prompt with the first `j` steps as an assistant turn to continue (none: a fresh reply)."""
    return [*prompt, {"role": "assistant", "content": "\n".join(steps[:j])}] if j else list(prompt)


def joined(steps: list[str], j: int, continuation: str) -> str:
    """The full text of a continuation after the first `j` steps: on the next line (a chat template may strip
    the prefix's closing newline, so a continuation may start right at the next step)."""
    if not j:
        return continuation
    return "\n".join(steps[:j]) + ("" if continuation.startswith("\n") else "\n") + continuation


@dataclass
class Probe:
    """One wrong solution on its way to a pair: its steps, the rate after each probed step, the located step."""

    solution: dict
    steps: list[str]
    rate: float  # the question's pass rate: the rate after zero steps
    rates: list[float] = field(default_factory=list)
    step: int | None = None  # 1-based index of the first wrong step
    locator: str = "rollouts"


@dataclass(frozen=True)
class StepDPO:
    """`__call__(seeds, solutions, lm, judge=None)` → `Pairs`."""

    locator: str = _DEFAULTS.locator
    solutions_per_question: int = _DEFAULTS.solutions_per_question
    rollouts: int = _DEFAULTS.rollouts
    max_rollouts: int = _DEFAULTS.max_rollouts
    wrong_rate: float = _DEFAULTS.wrong_rate
    rectify_samples: int = _DEFAULTS.rectify_samples
    temperature: float = _DEFAULTS.temperature
    max_tokens: int = _DEFAULTS.max_tokens
    seed: int = _DEFAULTS.seed
    numeric_tolerance: float = IRPOSection().numeric_tolerance

    def __call__(self, seeds: list[dict], solutions: pa.Table, lm: LanguageModel,
                 judge: LanguageModel | None = None) -> Pairs:
        gold = {s["seed_id"]: s for s in seeds}
        rejects: list[dict] = []
        probes = self._wrong_solutions(solutions)
        if self.locator == "judge" and judge is not None:
            self._judge(probes, gold, judge)
        self._roll_out([p for p in probes if p.step is None], lm, rejects)
        located = [p for p in probes if p.step is not None]
        return Pairs.of(self._rectify(located, lm, rejects), rejects)

    def _wrong_solutions(self, solutions: pa.Table) -> list[Probe]:
        """The first `solutions_per_question` distinct wrong solutions of each question (a repeated text would
        give the same pair again)."""
        probes = []
        for group in by_seed(solutions).values():
            rate = pass_rate(group)
            wrong = {" ".join(s["solution"].split()): s for s in reversed(group) if s["is_correct"] is False}
            for solution in sorted(wrong.values(), key=lambda s: s["sample_index"])[: self.solutions_per_question]:
                probes.append(Probe(solution, split_steps(solution["solution"]), rate))
        return probes

    def _sampling(self, n: int, offset: int = 0) -> Sampling:
        return Sampling(n=n, temperature=self.temperature, top_p=1.0, max_tokens=self.max_tokens,
                        seed=self.seed + offset)

    def _verifies(self, probe: Probe, text: str, finish_reason: str = "stop") -> bool:
        s = probe.solution
        return verify(text, s["final_answer"], s["answer_type"], self.numeric_tolerance,
                      truncated=finish_reason == "length").is_correct is True

    def _judge(self, probes: list[Probe], gold: dict[str, dict], judge: LanguageModel) -> None:
        """Ask the judge for the first wrong step of each solution whose seed has a gold solution."""
        asked = [p for p in probes if gold[p.solution["seed_id"]].get("gold_solution")]
        prompts = [judge_prompt(gold[p.solution["seed_id"]], p.steps) for p in asked]
        answers = judge.chat(prompts, Sampling(n=1, temperature=0.0, max_tokens=16)) if asked else []
        for probe, out in zip(asked, answers):
            probe.step = judged_step(out[0].text, len(probe.steps))
            probe.locator = "judge" if probe.step is not None else "rollouts"

    def _roll_out(self, probes: list[Probe], lm: LanguageModel, rejects: list[dict]) -> None:
        """Success rates after each probed step prefix (one batch for every solution), then the located step."""
        probes = [p for p in probes if self._solvable(p, rejects)]
        asked = [(p, j) for p in probes for j in range(1, self._probed(p) + 1)]
        outs = lm.chat([continued(p.solution["prompt"], p.steps, j) for p, j in asked],
                       self._sampling(self.rollouts)) if asked else []
        for (probe, j), samples in zip(asked, outs):
            probe.rates.append(sum(self._verifies(probe, joined(probe.steps, j, c.text), c.finish_reason)
                                   for c in samples) / len(samples))
        for probe in probes:
            probe.step = self._first_wrong(probe)
            if probe.step is None:
                rejects.append(solution_reject(probe.solution, "budget_exhausted", self._budget_detail(probe),
                                               probe.rate, "step_dpo"))

    def _solvable(self, probe: Probe, rejects: list[dict]) -> bool:
        """Whether rollouts can blame a step: some sample of the question solved it (else a reject row)."""
        if probe.rate > self.wrong_rate:
            return True
        detail = f"pass rate {probe.rate:.3f} <= wrong_rate {self.wrong_rate}: no sample solved it, no step to blame"
        rejects.append(solution_reject(probe.solution, "unsolved", detail, probe.rate, "step_dpo"))
        return False

    def _probed(self, probe: Probe) -> int:
        """Prefixes probed: every step but the last (it ends in the wrong answer), within the budget."""
        return min(len(probe.steps) - 1, self.max_rollouts // self.rollouts)

    def _first_wrong(self, probe: Probe) -> int | None:
        """The first step after which at most `wrong_rate` continuations verify; the last step when every
        step before it was probed and passed; None when the budget ended first."""
        for j, rate in enumerate(probe.rates, 1):
            if rate <= self.wrong_rate:
                return j
        return len(probe.steps) if len(probe.rates) == len(probe.steps) - 1 else None

    def _budget_detail(self, probe: Probe) -> str:
        return (f"every one of the {len(probe.rates)} probed steps (of {len(probe.steps)}) still succeeds "
                f"(rates {probe.rates}); raise step_dpo.max_rollouts to probe further")

    def _rectify(self, probes: list[Probe], lm: LanguageModel, rejects: list[dict]) -> list[dict]:
        """Resample from the prefix before each located step; a verified continuation with another step wins."""
        outs = lm.chat([continued(p.solution["prompt"], p.steps, p.step - 1) for p in probes],
                       self._sampling(self.rectify_samples, RECTIFY_SEED_OFFSET)) if probes else []
        pairs = []
        for probe, samples in zip(probes, outs):
            fixed = next((t for t, c in ((joined(probe.steps, probe.step - 1, c.text), c) for c in samples)
                          if self._rectifies(probe, t, c.finish_reason)), None)
            if fixed is None:
                detail = f"none of {len(samples)} continuations from step {probe.step - 1} reaches the gold answer"
                rejects.append(solution_reject(probe.solution, "rectify_failed", detail, probe.rate, "step_dpo"))
            else:
                pairs.append(step_pair(probe, fixed))
        return pairs

    def _rectifies(self, probe: Probe, text: str, finish_reason: str) -> bool:
        """`text` keeps the correct prefix, replaces the wrong step with another one, and verifies."""
        k, steps = probe.step, split_steps(text)
        return (len(steps) >= k and steps[: k - 1] == probe.steps[: k - 1] and steps[k - 1] != probe.steps[k - 1]
                and self._verifies(probe, text, finish_reason))


def judge_prompt(seed: dict, steps: list[str]) -> Conversation:
    numbered = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, 1))
    return [{"role": "user", "content": f"Problem:\n{seed['question']}\n\nReference solution:\n"
             f"{seed['gold_solution']}\n\nA student's solution, one step per line:\n{numbered}\n\n"
             "Which is the first incorrect step of the student's solution? Answer with its number only."}]


def judged_step(answer: str, num_steps: int) -> int | None:
    """The step number the judge answered, when it is one of the solution's steps."""
    found = re.search(r"\d+", answer)
    step = int(found.group()) if found else 0
    return step if 1 <= step <= num_steps else None


def step_pair(probe: Probe, fixed: str) -> dict:
    s, k = probe.solution, probe.step
    prompt = continued(s["prompt"], probe.steps, k - 1)
    chosen = split_steps(fixed)[k - 1]
    return {"pair_id": stable_id("pair", "step_dpo", s["solution_id"], k, fixed),
            "prompt_id": stable_id("prompt", prompt), "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": probe.steps[k - 1]}],
            "rejected_candidate_id": s["solution_id"], "seed_id": s["seed_id"], "policy_model": s["model"],
            "source": "step_dpo", "pass_rate": probe.rate, "chosen_is_correct": True, "rejected_is_correct": False,
            "chosen_answer": final_answer(fixed),
            "rejected_answer": s["answer"], "gold_answer": s["final_answer"], "step_index": k,
            "step_success_rates": probe.rates, "step_locator": probe.locator, "chosen_solution": fixed,
            "rejected_solution": s["solution"], **GOLD_SCORES}
