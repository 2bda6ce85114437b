"""User-simulator self-chat: a simulated user and an assistant take turns from a seed question.

The simulator is prompted with the persona and the transcript so far and asked for a short thought
(why) and then the user's next message; the thought is stripped and never enters the conversation.
All live conversations advance together, one batched call per role per turn, so the engine always
gets full batches. A conversation stops at `max_turns` assistant replies, when its token budget is
spent, or when the simulated user says it is done.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import pyarrow as pa

from operators.ids import stable_id
from schemas.tables import CONVERSATIONS
from serving.protocols import Completion, Conversation, LanguageModel, Message, Sampling

END_MARK = "[END]"
SIMULATOR_SYSTEM = (
    "You play the USER in a conversation with an AI assistant. Stay in character as: {persona}. "
    "First write one line starting with 'Thought:' saying what you still want to know and why. "
    "Then write one line starting with 'User:' with your next message to the assistant: a short, natural "
    "follow-up question. If your question has been fully answered, write 'User: " + END_MARK + "'."
)
_USER_LINE = re.compile(r"^\s*\**\s*user\s*\**\s*:\s*\**\s*", re.IGNORECASE | re.MULTILINE)
_THOUGHT_LINE = re.compile(r"^\s*\**\s*(thought|justification|reasoning)\s*\**\s*:.*$", re.IGNORECASE | re.MULTILINE)
_ROLE_LINE = re.compile(r"^\s*\**\s*(assistant|ai)\s*\**\s*:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class UserTurn:
    text: str | None
    ended: bool
    raw_output: str


def simulator_prompt(persona: str | None, messages: Conversation) -> Conversation:
    """The simulator's request: its role and the transcript, asking for the user's next message."""
    transcript = "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)
    return [
        Message(role="system", content=SIMULATOR_SYSTEM.format(persona=persona or "a curious person")),
        Message(role="user", content=f"The conversation so far:\n\n{transcript}\n\nWhat does the USER say next?"),
    ]


def parse_user_turn(raw: str) -> UserTurn:
    """The user's next message with the thought stripped; `ended` when the user is done or said nothing."""
    text = raw
    markers = list(_USER_LINE.finditer(text))
    if markers:
        text = text[markers[-1].end():]
    text = _THOUGHT_LINE.sub("", text)
    role = _ROLE_LINE.search(text)
    if role:
        text = text[: role.start()]
    text = text.strip().strip('"').strip()
    if not text or END_MARK.lower() in text.lower():
        return UserTurn(None, True, raw)
    return UserTurn(text, False, raw)


@dataclass(frozen=True)
class SelfChat:
    """Runs self-chat for a batch of seeds. Config in fields; `__call__(seeds, assistant, simulator)`.

    With models that have `achat` (an async engine) each conversation runs its own turn loop, so its next
    turn starts as soon as its last one ends; otherwise all live conversations advance together, one
    batched call per role per turn. Both drivers make the same requests with the same seeds.
    """

    max_turns: int = 3
    token_budget: int = 1024
    max_tokens_per_turn: int = 192
    simulator_max_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    id_salt: str = field(default="", repr=False)

    def __call__(self, seeds: list[dict], assistant: LanguageModel, simulator: LanguageModel | None = None,
                 progress=None) -> pa.Table:
        """One conversation per seed, as a `conversations` table."""
        simulator = simulator or assistant
        states = [_State(seed, [Message(role="user", content=seed["question"])]) for seed in seeds]
        if hasattr(assistant, "achat") and hasattr(simulator, "achat"):
            asyncio.run(self._converse_all(states, assistant, simulator))
        else:
            self._turn_by_turn(states, assistant, simulator, progress)
        for state in states:
            state.ended_by = state.ended_by or "max_turns"
        return pa.Table.from_pylist([self._row(s, assistant, simulator) for s in states], schema=CONVERSATIONS)

    def _turn_by_turn(self, states: list[_State], assistant: LanguageModel, simulator: LanguageModel,
                      progress) -> None:
        for turn in range(self.max_turns):
            _batched([s for s in states if s.live], assistant, lambda s: self._assistant_request(s, turn),
                     self._take_reply)
            if turn + 1 < self.max_turns:
                _batched([s for s in states if s.live], simulator, lambda s: self._user_request(s, turn),
                         self._take_user_turn)
            if progress:
                progress(turn + 1, self.max_turns)

    async def _converse_all(self, states: list[_State], assistant, simulator) -> None:
        await asyncio.gather(*(self._converse(s, assistant, simulator) for s in states))

    async def _converse(self, state: _State, assistant, simulator) -> None:
        for turn in range(self.max_turns):
            [reply] = await assistant.achat(*self._assistant_request(state, turn))
            self._take_reply(state, reply)
            if not state.live or turn + 1 == self.max_turns:
                return
            [out] = await simulator.achat(*self._user_request(state, turn))
            self._take_user_turn(state, out)
            if not state.live:
                return

    def _assistant_request(self, state: _State, turn: int) -> tuple[Conversation, Sampling]:
        budget = min(self.max_tokens_per_turn, self.token_budget - state.tokens)
        return state.messages, self._sampling(budget, turn, role=0)

    def _take_reply(self, state: _State, reply: Completion) -> None:
        state.add("assistant", reply.text, reply.num_tokens)
        if state.tokens >= self.token_budget:
            state.ended_by = "token_budget"

    def _user_request(self, state: _State, turn: int) -> tuple[Conversation, Sampling]:
        budget = min(self.simulator_max_tokens, self.token_budget - state.tokens)
        prompt = simulator_prompt(state.seed.get("persona"), state.messages)
        return prompt, self._sampling(budget, turn, role=1, stop=("\nASSISTANT:",))

    def _take_user_turn(self, state: _State, out: Completion) -> None:
        parsed = parse_user_turn(out.text)
        state.tokens += out.num_tokens
        if parsed.ended:
            state.ended_by = "user_ended"
        elif state.tokens >= self.token_budget:
            state.ended_by = "token_budget"
        else:
            state.messages.append(Message(role="user", content=parsed.text))

    def _sampling(self, max_tokens: int, turn: int, role: int, stop: tuple[str, ...] = ()) -> Sampling:
        return Sampling(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens,
                        seed=self.seed + 2 * turn + role, stop=stop)

    def _row(self, state: _State, assistant: LanguageModel, simulator: LanguageModel) -> dict:
        seed_id = state.seed["seed_id"]
        return {
            "conversation_id": stable_id("conv", seed_id, self.seed, self.id_salt),
            "seed_id": seed_id,
            "messages": state.messages,
            "num_turns": sum(m["role"] == "assistant" for m in state.messages),
            "ended_by": state.ended_by,
            "num_tokens": state.tokens,
            "simulator_model": simulator.name,
            "assistant_model": assistant.name,
        }


def _batched(states: list[_State], lm: LanguageModel, request, take) -> None:
    """One `chat` call per distinct Sampling (usually one), results handed back to each state."""
    groups: dict[Sampling, list[tuple[_State, Conversation]]] = {}
    for state in states:
        conversation, sampling = request(state)
        groups.setdefault(sampling, []).append((state, conversation))
    for sampling, group in groups.items():
        for (state, _), [completion] in zip(group, lm.chat([c for _, c in group], sampling)):
            take(state, completion)


@dataclass
class _State:
    seed: dict
    messages: list[Message]
    tokens: int = 0
    ended_by: str | None = None

    @property
    def live(self) -> bool:
        return self.ended_by is None

    def add(self, role: str, content: str, num_tokens: int) -> None:
        self.messages.append(Message(role=role, content=content))
        self.tokens += num_tokens
