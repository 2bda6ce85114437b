"""Plausible `pairs` and `critiques` tables built by hand, for the downstream tests (export, training,
show, card) that must not wait on the pair-mining operator or a model run."""

from __future__ import annotations

import math

import pyarrow as pa

from prefmill.schemas.tables import CRITIQUES, PAIRS
from prefmill.storage.catalog import Catalog, Version

# (prompt turns, chosen reply, rejected reply): short real texts, some multi-turn
PROMPTS = [
    ([("user", "Why is the sky blue?")],
     "Sunlight scatters off air molecules, and short blue wavelengths scatter far more than red (Rayleigh "
     "scattering), so blue light reaches your eyes from every direction.",
     "Because the sky reflects the colour of the oceans."),
    ([("user", "When was the Eiffel Tower finished?"), ("assistant", "Do you mean its construction?"),
      ("user", "Yes, when was it completed?")],
     "It was completed in March 1889, in time for the Exposition Universelle in Paris.",
     "It was completed in 1899 for the Olympic Games."),
    ([("user", "How many bones does an adult human have?")],
     "An adult human skeleton usually has 206 bones.",
     "Adults have about 300 bones, the same as newborns."),
    ([("user", "What does photosynthesis produce?")],
     "Plants turn carbon dioxide and water into glucose and release oxygen, powered by light.",
     "Photosynthesis produces carbon dioxide at night."),
    ([("user", "I'm learning Python."), ("assistant", "Great! What would you like to know?"),
      ("user", "How do I reverse a list?")],
     "Use `items.reverse()` to reverse in place, or `items[::-1]` for a reversed copy.",
     "Python lists cannot be reversed; convert them to a string first."),
    ([("user", "What is the boiling point of water at sea level?")],
     "100 °C (212 °F) at standard atmospheric pressure.",
     "Water boils at 90 °C everywhere."),
]
REVISED_PROMPT = 1  # the Eiffel Tower pair: its chosen reply is a critique-revised one
ORIGINAL_ID = "cand-eiffel-original"
CRITIQUE_TEXT = "The passage says the tower was completed in 1889, not 1899."


def _messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def pair_rows(pairs_per_prompt: int = 2, run_id: str = "run-test") -> list[dict]:
    """`pairs_per_prompt` pairs per prompt (the second with a slightly worse rejected reply)."""
    rows = []
    for p, (turns, chosen, rejected) in enumerate(PROMPTS):
        for k in range(pairs_per_prompt):
            reward_c, reward_r = 0.4 + 0.1 * p, -0.2 - 0.1 * k
            fact_c, fact_r = 1.0, 0.25 * k
            score_c, score_r = reward_c + fact_c, reward_r + fact_r
            revised = p == REVISED_PROMPT and k == 0
            rows.append(dict(
                pair_id=f"pair-{p}-{k}", prompt_id=f"prompt-{p}", prompt=_messages(turns),
                chosen=_messages([("assistant", chosen)]),
                rejected=_messages([("assistant", rejected if k == 0 else rejected + " Probably.")]),
                chosen_candidate_id=f"cand-{p}-c{k}", rejected_candidate_id=f"cand-{p}-r{k}",
                chosen_revised_from=ORIGINAL_ID if revised else None, rejected_revised_from=None,
                score_chosen=score_c, score_rejected=score_r, chosen_reward=reward_c, rejected_reward=reward_r,
                chosen_factuality=fact_c, rejected_factuality=fact_r, margin=score_c - score_r,
                chosen_win_prob=1 / (1 + math.exp(score_r - score_c)), chosen_mean_win_prob=0.8,
                rejected_mean_win_prob=0.2, num_candidates=4, strategy="best_vs_worst",
                conversation_id=f"conv-{p}", seed_id=f"seed-{p}", policy_model="smollm2-135m",
                scorer_model="smollm2-135m", critic_model="smollm2-135m", run_id=run_id))
    return rows


def critique_rows() -> list[dict]:
    """The critique of the original Eiffel Tower reply: one contradicted claim, fixed."""
    claim = dict(claim="The Eiffel Tower was completed in 1899.", verdict="contradicted", critique=CRITIQUE_TEXT,
                 evidence="The tower was completed in March 1889.", action="fix", raw_output=None, error=None)
    kept = dict(claim="It was built for a world's fair.", verdict="supported", critique="The passage agrees.",
                evidence="Built for the 1889 Exposition Universelle.", action="keep", raw_output=None, error=None)
    rounds = [dict(round=0, response="It was completed in 1899 for a world's fair.", claims=[claim, kept],
                   score=0.5, raw_output=None, error=None)]
    return [dict(candidate_id=ORIGINAL_ID, context_id="ctx-1", rounds=rounds,
                 final_response=PROMPTS[REVISED_PROMPT][1], initial_score=0.5, final_score=1.0,
                 num_parse_failures=0, num_calls=4, critic_model="smollm2-135m")]


def publish_pairs(catalog: Catalog, pairs_per_prompt: int = 2, name_parent: bool = True) -> Version:
    """A critiques version, then a pairs version (naming the critiques version as its parent, or not: a
    pipeline run publishes both in one snapshot and names none)."""
    critiques = catalog.publish(pa.Table.from_pylist(critique_rows(), schema=CRITIQUES), "critiques",
                                {"run_id": "run-test"}, CRITIQUES)
    lineage = {"run_id": "run-test", "config": {"pairs": {"strategy": "best_vs_worst", "min_margin": 0.1}},
               "models": ["smollm2-135m"]}
    if name_parent:
        lineage["parents"] = {"critiques": critiques.version}
    return catalog.publish(pa.Table.from_pylist(pair_rows(pairs_per_prompt), schema=PAIRS), "pairs", lineage, PAIRS)
