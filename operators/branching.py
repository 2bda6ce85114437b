"""Branched multi-turn rollouts (REFUEL, Gao et al. 2024): two futures of one self-chat prefix, ranked by the
sum of their per-turn rewards.

A self-chat conversation of H assistant turns branches at a turn h (one picked uniformly at random with an RNG
seeded per conversation, or every turn): the whole future from the shared prefix `messages[:prefix]` (which
ends in the user turn before assistant turn h) is sampled again with shifted seeds, simulator and assistant
both, through the same `Dialogues` (same gates, token budget and turn limit) and in the same request stream as
self-chat. A branch starts as soon as its prefix exists, beside the conversation's own future, rather than
when the conversation ends (the dependency chain would double): the uniform pick is drawn from the
`max_turns` a conversation may reach, and one that ends before its pick branches at one of the H turns it has,
drawn again, which makes every one of its H turns equally likely. The original conversation is one trajectory
and the branch the other. After every assistant turn of both futures is scored, a branch gives a pair (prompt =
the shared prefix, chosen/rejected = the two continuations as message lists, with per-turn rewards and the
future-reward difference), or a reject row with its reason: a future that a gate, the token budget or the
context window ended early, or futures whose summed rewards differ by less than the margin.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pyarrow as pa

from prefmill.operators.ids import stable_id
from prefmill.operators.reasoning import Pairs
from prefmill.operators.selfchat import Dialogues
from prefmill.schemas.config import BranchingSection
from prefmill.schemas.tables import BRANCHES
from prefmill.serving.protocols import PROMPT_TOO_LONG, Request

_DEFAULTS = BranchingSection()  # the config section holds every default: one definition
TURN_CHOICES = ("uniform", "every")
EARLY_ENDS = (PROMPT_TOO_LONG, "token_budget")  # and every "gate:…": a future cut short, not finished
CONVERSATION_COLUMNS = ("conversation_id", "seed_id", "messages", "num_turns", "ended_by", "num_tokens",
                        "simulator_model", "assistant_model", "gates")


@dataclass(frozen=True)
class Branching:
    """Which turns of a conversation branch and when, with which seeds, and the `branches` rows."""

    turns: str = _DEFAULTS.turns
    seed_offset: int = _DEFAULTS.seed_offset
    seed: int = _DEFAULTS.seed

    def __post_init__(self):
        if self.turns not in TURN_CHOICES:
            raise ValueError(f"branching.turns must be one of {TURN_CHOICES}, got {self.turns!r}")

    def planned_turns(self, conversation_id: str, max_turns: int) -> list[int]:
        """The turns (0-based) a conversation branches at as soon as their prefix exists: every turn, or one
        drawn uniformly from the `max_turns` it may reach."""
        if self.turns == "every":
            return list(range(max_turns))
        return [random.Random(f"{self.seed}:{conversation_id}").randrange(max_turns)]

    def fallback_turns(self, conversation_id: str, num_turns: int) -> list[int]:
        """Where a conversation that ended before its planned turn branches (uniform): one of the `num_turns`
        it has, drawn uniformly, so that over both draws each of its turns is equally likely."""
        if self.turns == "every" or not num_turns:
            return []
        return [random.Random(f"{self.seed}:{conversation_id}:ended").randrange(num_turns)]

    def branch_turns(self, conversation_id: str, max_turns: int, num_turns: int) -> list[int]:
        """The turns a conversation that ended with `num_turns` assistant turns has branched at."""
        planned = [h for h in self.planned_turns(conversation_id, max_turns) if h < num_turns]
        return planned or self.fallback_turns(conversation_id, num_turns)

    def requests(self, dialogues: Dialogues, i: int) -> list[Request]:
        """The first requests of conversation i's branches that can start now and have not yet: a planned turn
        as soon as the user turn before it exists, so the branch runs beside the conversation's own future;
        once the conversation has ended without reaching its planned turn, the fallback turn."""
        users = [k for k, m in enumerate(dialogues.messages(i)) if m["role"] == "user"]
        conversation, started = dialogues.conversation_id(i), dialogues.branched(i)
        turns = [h for h in self.planned_turns(conversation, dialogues.chat.max_turns) if h < len(users)]
        if not turns and not started and dialogues.ended(i):  # its planned turn was never reached
            turns = self.branch_turns(conversation, dialogues.chat.max_turns,
                                      len(assistant_positions(dialogues.messages(i))))
        return [dialogues.branch(i, users[h] + 1, self.seed_offset) for h in turns if users[h] + 1 not in started]

    def table(self, dialogues: Dialogues) -> pa.Table:
        """Every branch of the run as a `branches` row, by conversation and turn whatever order they finished in
        (rewards are filled in by the branching stage)."""
        starts = sorted(dialogues.branches(), key=lambda b: b[1:])
        return pa.Table.from_pylist([self._row(dialogues, *b) for b in starts], schema=BRANCHES)

    def _row(self, dialogues: Dialogues, j: int, i: int, prefix: int) -> dict:
        row = dialogues.row(j)
        turn = sum(m["role"] == "assistant" for m in row["messages"][:prefix])
        return {**{name: row[name] for name in CONVERSATION_COLUMNS}, "branch_turn": turn, "prefix_length": prefix,
                "branch_id": stable_id("branch", row["conversation_id"], turn, self.seed_offset),
                "seed_offset": self.seed_offset}


def assistant_positions(messages: list[dict]) -> list[int]:
    """Where each assistant turn sits in `messages`: the prefix before one ends in its user turn."""
    return [k for k, m in enumerate(messages) if m["role"] == "assistant"]


@dataclass(frozen=True)
class Trajectory:
    """One future of a branch point: its id (conversation or branch), messages and how it ended."""

    id: str
    messages: list[dict]
    ended_by: str

    def turn_keys(self, prefix: int) -> list[str]:
        """Score keys of its assistant turns from `prefix` on."""
        return [f"{self.id}#{k}" for k in assistant_positions(self.messages) if k >= prefix]


def trajectories(branch: dict, conversations: dict[str, dict]) -> tuple[Trajectory, Trajectory]:
    """The branch's conversation and the branch itself, as the two trajectories of its branch point."""
    original = conversations[branch["conversation_id"]]
    return (Trajectory(original["conversation_id"], original["messages"], original["ended_by"]),
            Trajectory(branch["branch_id"], branch["messages"], branch["ended_by"]))


def turn_items(branches: list[dict], conversations: dict[str, dict]) -> list[dict]:
    """Every assistant turn of both futures of every branch as a candidate-like row (context = the messages
    before it, reply = the turn) for FLR, each turn once, keyed `candidate_id` = "<trajectory id>#<index>"."""
    items: dict[str, dict] = {}
    for branch in branches:
        for path in trajectories(branch, conversations):
            for key in path.turn_keys(branch["prefix_length"]):
                k = int(key.rsplit("#", 1)[1])
                items[key] = {"candidate_id": key, "context_id": path.id, "context": path.messages[:k],
                              "reply": path.messages[k]["content"]}
    return list(items.values())


@dataclass(frozen=True)
class BranchPairs:
    """`__call__(branches, conversations, rewards, scorer)` → (branches with their rewards, `Pairs`): the
    higher-rewarded future chosen over the other."""

    margin: float = _DEFAULTS.margin

    def __call__(self, branches: list[dict], conversations: dict[str, dict], rewards: dict[str, float],
                 scorer: str) -> tuple[pa.Table, Pairs]:
        scored = [self._scored(b, conversations, rewards, scorer) for b in branches]
        pairs, rejects = [], []
        for branch in scored:
            problem = self._problem(branch, conversations[branch["conversation_id"]])
            if problem:
                rejects.append(_reject(branch, *problem))
            else:
                pairs.append(self._pair(branch, conversations[branch["conversation_id"]], scorer))
        return pa.Table.from_pylist(scored, schema=BRANCHES), Pairs.of(pairs, rejects)

    @staticmethod
    def _scored(branch: dict, conversations: dict[str, dict], rewards: dict[str, float], scorer: str) -> dict:
        original, own = trajectories(branch, conversations)
        ours = [rewards[k] for k in own.turn_keys(branch["prefix_length"])]
        theirs = [rewards[k] for k in original.turn_keys(branch["prefix_length"])]
        return {**branch, "turn_rewards": ours, "future_reward": sum(ours), "original_turn_rewards": theirs,
                "original_future_reward": sum(theirs), "scorer_model": scorer}

    def _problem(self, branch: dict, original: dict) -> tuple[str, str] | None:
        if math.isnan(branch["future_reward"]) or math.isnan(branch["original_future_reward"]):
            return "no_turn_reward", "a turn of a future has no reward (the judge's output did not parse)"
        for name, row in (("branch", branch), ("original conversation", original)):
            reason = early_end(row["ended_by"])
            if reason:
                return reason, f"the {name}'s future was cut short ({row['ended_by']}), so its summed reward " \
                               f"does not cover a whole future"
        diff = abs(branch["future_reward"] - branch["original_future_reward"])
        if diff < self.margin or diff == 0:
            return ("tie" if diff == 0 else "under_margin"), f"the futures' rewards differ by {diff:.4f}, under " \
                                                             f"branching.margin = {self.margin}"
        return None

    @staticmethod
    def _pair(branch: dict, original: dict, scorer: str) -> dict:
        prefix = branch["prefix_length"]
        sides = [(branch["branch_id"], branch["messages"], branch["turn_rewards"], branch["future_reward"]),
                 (original["conversation_id"], original["messages"], branch["original_turn_rewards"],
                  branch["original_future_reward"])]
        chosen, rejected = sorted(sides, key=lambda side: side[3], reverse=True)
        prompt = list(branch["messages"][:prefix])
        return {"pair_id": stable_id("pair", "refuel", branch["branch_id"], chosen[0], rejected[0]),
                "prompt_id": prompt_id(branch), "prompt": prompt,
                "chosen": chosen[1][prefix:], "rejected": rejected[1][prefix:],
                "chosen_candidate_id": chosen[0], "rejected_candidate_id": rejected[0],
                "score_chosen": chosen[3], "score_rejected": rejected[3], "chosen_reward": chosen[3],
                "rejected_reward": rejected[3], "margin": chosen[3] - rejected[3], "num_candidates": 2,
                "strategy": "refuel", "conversation_id": original["conversation_id"], "seed_id": branch["seed_id"],
                "policy_model": original["assistant_model"], "scorer_model": scorer, "source": "refuel",
                "branch_turn": branch["branch_turn"], "chosen_turn_rewards": chosen[2],
                "rejected_turn_rewards": rejected[2], "future_reward_diff": chosen[3] - rejected[3]}


def early_end(ended_by: str) -> str | None:
    """The reject reason of a future that ended before it finished (a gate, the token budget, the context
    window); None for one that ran to max_turns or that the simulated user ended."""
    if ended_by.startswith("gate:"):
        return "gate"
    return ended_by if ended_by in EARLY_ENDS else None


def prompt_id(branch: dict) -> str:
    """The shared prefix's id: self-chat's `context_id` of the same prefix (it ends in the conversation's user
    turn), so the TRL split and dedup see one prompt whichever source a pair came from."""
    return stable_id("ctx", branch["conversation_id"], branch["prefix_length"] - 1)


def _reject(branch: dict, reason: str, detail: str) -> dict:
    return {"prompt_id": prompt_id(branch), "candidate_id": branch["branch_id"],
            "seed_id": branch["seed_id"], "reason": reason, "detail": detail, "num_candidates": 2,
            "best_margin": abs(branch["future_reward"] - branch["original_future_reward"]), "source": "refuel"}
