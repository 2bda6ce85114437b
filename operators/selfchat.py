"""User-simulator self-chat: a simulated user and an assistant take turns from a seed question.

The simulator is prompted with the persona and the transcript so far and asked for a short thought
(why) and then the user's next message; the thought is stripped and never enters the conversation.
All conversations start together and each one's next turn is requested the moment its last one ends
(see `operators.streams`), so the engine always has every live conversation in its batch. A
conversation stops at `max_turns` assistant replies, when its token budget is spent, when the
simulated user says it is done, or when a turn's prompt no longer fits the model's context window (the
backend answers `PROMPT_TOO_LONG`: the conversation keeps the turns it has, `ended_by` says so, and the rest
of the batch goes on).

Quality gates (`operators.gates`) check every simulated-user turn: one that is empty, mostly repeats the
assistant's last answer or an earlier user turn, or narrates ("The user explains ...") is sampled once
more with another seed and otherwise ends the conversation there. Each decision is kept in the
conversation's `gates` column with its reason.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import pyarrow as pa

from prefmill.operators.gates import ECHO_THRESHOLD, REPEAT_THRESHOLD, user_turn_gate
from prefmill.operators.ids import stable_id
from prefmill.operators.streams import run_requests
from prefmill.schemas.config import SelfChatSection
from prefmill.schemas.tables import CONVERSATIONS
from prefmill.serving.protocols import (
    PROMPT_TOO_LONG,
    Completion,
    Conversation,
    LanguageModel,
    Message,
    Request,
    Sampling,
)

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


_DEFAULTS = SelfChatSection()  # the config section holds every default: one definition


@dataclass(frozen=True)
class SelfChat:
    """Runs self-chat for a batch of seeds. Config in fields; `__call__(seeds, assistant, simulator)`.

    Each conversation is a chain of requests (assistant, simulator, assistant, ...). With one engine that
    can stream, a conversation's next turn joins the running batch as soon as its last one ends; otherwise
    all live conversations advance together, one batched call per role per turn. Both make the same
    requests with the same seeds.
    """

    max_turns: int = _DEFAULTS.max_turns
    token_budget: int = _DEFAULTS.token_budget
    max_tokens_per_turn: int = _DEFAULTS.max_tokens_per_turn
    simulator_max_tokens: int = _DEFAULTS.simulator_max_tokens
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    seed: int = _DEFAULTS.seed
    gates: bool = True
    echo_threshold: float = ECHO_THRESHOLD
    repeat_threshold: float = REPEAT_THRESHOLD
    id_salt: str = field(default="", repr=False)

    def __call__(self, seeds: list[dict], assistant: LanguageModel, simulator: LanguageModel | None = None,
                 progress: Progress | None = None) -> pa.Table:
        """One conversation per seed, as a `conversations` table."""
        simulator = simulator or assistant
        dialogues = Dialogues(self, seeds, progress, (assistant.name, simulator.name))
        run_requests({"assistant": assistant, "simulator": simulator}, dialogues.first_requests(), dialogues.take)
        return dialogues.table()

    def conversation_id(self, seed_id: str, models: tuple[str, str]) -> str:
        """Hashes the seed and everything that shapes the conversation: this config, the simulator's
        instructions and the (assistant, simulator) model specs."""
        return stable_id("conv", seed_id, asdict(self), SIMULATOR_SYSTEM, models)

    def sampling(self, max_tokens: int, turn: int, role: int, stop: tuple[str, ...] = (), attempt: int = 0,
                 shift: int = 0) -> Sampling:
        """Turn `turn` of role 0 (assistant) or 1 (simulator): every conversation gets the same seed;
        a resampled user turn (`attempt` 1) gets another one, and a branch's turns (`shift`) others again."""
        return Sampling(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens,
                        seed=self.seed + shift + 2 * turn + role + RESAMPLE_SEED_STEP * attempt, stop=stop)


Progress = Callable[[int, int], None]
RESAMPLE_SEED_STEP = 7919


class Dialogues:
    """The live state of one self-chat run: each conversation's messages, and the request it needs next.

    Request keys are `("assistant" | "user", conversation index, turn)`; `take` consumes a finished
    request and returns the conversation's next one (none once it has ended). A branch (`branch`) is a
    conversation restarted from a prefix of another; its states follow the seeds' own, outside `table`.
    """

    def __init__(self, chat: SelfChat, seeds: list[dict], progress: Progress | None = None,
                 models: tuple[str, str] = ("default", "default")):
        self.chat, self.progress, self.finished, self.models = chat, progress, 0, models
        self.states = [_State(seed, [Message(role="user", content=seed["question"])]) for seed in seeds]
        self.num_conversations = len(seeds)
        self.prefixes: dict[int, set[int]] = {}  # conversation index → the prefix lengths it was branched at

    def first_requests(self) -> list[Request]:
        return [self._assistant_request(i, 0) for i in range(len(self.states))]

    def take(self, request: Request, completions: list[Completion]) -> list[Request]:
        kind, i, turn = request.key
        state = self.states[i]
        if kind == "assistant":
            self._take_reply(state, completions[0])
            if state.live and turn + 1 < self.chat.max_turns:
                return [self._user_request(i, turn)]
        else:
            retry = self._take_user_turn(state, completions[0], turn)
            if retry:
                return [self._user_request(i, turn, attempt=1)]
            if state.live:
                return [self._assistant_request(i, turn + 1)]
        self._finish(state)
        return []

    def messages(self, i: int) -> list[Message]:
        return self.states[i].messages

    def branch(self, i: int, prefix: int, seed_shift: int) -> Request:
        """A new conversation from conversation i's first `prefix` messages (ending in a user turn), its gates
        and token count there, every later turn sampled with seeds shifted by `seed_shift`; its first request."""
        state = self.states[i]
        turn = sum(m["role"] == "assistant" for m in state.messages[:prefix])
        self.states.append(_State(state.seed, list(state.messages[:prefix]), state.spent[prefix - 1],
                                  gates=[g for g in state.gates if g["turn"] < turn],
                                  spent=state.spent[:prefix], seed_shift=seed_shift, origin=(i, prefix)))
        self.prefixes.setdefault(i, set()).add(prefix)
        return self._assistant_request(len(self.states) - 1, turn)

    def ended(self, i: int) -> bool:
        return not self.states[i].live

    def branched(self, i: int) -> set[int]:
        """The prefix lengths conversation i has been branched at so far."""
        return self.prefixes.get(i, set())

    def is_branch(self, i: int) -> bool:
        return i >= self.num_conversations

    def branches(self) -> list[tuple[int, int, int]]:
        """Every branch as (its index, the conversation it branches, its prefix length)."""
        return [(j, *self.states[j].origin) for j in range(self.num_conversations, len(self.states))]

    def row(self, i: int) -> dict:
        """State i as a `conversations` row (a branch carries its conversation's id)."""
        return self._row(self.states[i])

    def seed_id(self, i: int) -> str:
        return self.states[i].seed["seed_id"]

    def conversation_id(self, i: int) -> str:
        return self.chat.conversation_id(self.seed_id(i), self.models)

    def last_context_known(self, i: int) -> bool:
        """Whether conversation i's last user turn is its final one: it has ended, or only its last
        assistant reply is still to come."""
        state = self.states[i]
        turns = sum(m["role"] == "assistant" for m in state.messages)
        return not state.live or (state.messages[-1]["role"] == "user" and turns == self.chat.max_turns - 1)

    def table(self) -> pa.Table:
        return pa.Table.from_pylist([self._row(s) for s in self.states[:self.num_conversations]], schema=CONVERSATIONS)

    def _assistant_request(self, i: int, turn: int) -> Request:
        state = self.states[i]
        budget = min(self.chat.max_tokens_per_turn, self.chat.token_budget - state.tokens)
        sampling = self.chat.sampling(budget, turn, role=0, shift=state.seed_shift)
        return Request(("assistant", i, turn), list(state.messages), sampling, "assistant")

    def _user_request(self, i: int, turn: int, attempt: int = 0) -> Request:
        state = self.states[i]
        budget = min(self.chat.simulator_max_tokens, self.chat.token_budget - state.tokens)
        prompt = simulator_prompt(state.seed.get("persona"), state.messages)
        sampling = self.chat.sampling(budget, turn, role=1, stop=("\nASSISTANT:",), attempt=attempt,
                                      shift=state.seed_shift)
        return Request(("user", i, turn), prompt, sampling, "simulator")

    def _take_reply(self, state: _State, reply: Completion) -> None:
        if reply.finish_reason == PROMPT_TOO_LONG:
            state.ended_by = PROMPT_TOO_LONG
            return
        state.add("assistant", reply.text, reply.num_tokens)
        if state.tokens >= self.chat.token_budget:
            state.ended_by = "token_budget"

    def _take_user_turn(self, state: _State, out: Completion, turn: int) -> bool:
        """Add the simulated user's turn, or end the conversation; True when the turn failed a gate for
        the first time and should be sampled once more."""
        if out.finish_reason == PROMPT_TOO_LONG:
            state.ended_by = PROMPT_TOO_LONG
            return False
        parsed = parse_user_turn(out.text)
        state.tokens += out.num_tokens
        said_end = parsed.ended and END_MARK.lower() in out.text.lower()
        gate = None if said_end or not self.chat.gates else user_turn_gate(
            parsed.text, state.messages, self.chat.echo_threshold, self.chat.repeat_threshold)
        if gate:
            retry = not any(g["turn"] == turn for g in state.gates) and state.tokens < self.chat.token_budget
            state.gates.append({"turn": turn, "gate": gate, "action": "resample" if retry else "end",
                                "text": parsed.text or out.text})
            if not retry:
                state.ended_by = f"gate:{gate}"
            return retry
        if parsed.ended:
            state.ended_by = "user_ended"
        elif state.tokens >= self.chat.token_budget:
            state.ended_by = "token_budget"
        else:
            state.add("user", parsed.text, 0)
        return False

    def _finish(self, state: _State) -> None:
        state.ended_by = state.ended_by or "max_turns"
        if state.origin is None:
            self.finished += 1
            if self.progress:
                self.progress(self.finished, self.num_conversations)

    def _row(self, state: _State) -> dict:
        seed_id = state.seed["seed_id"]
        assistant_name, simulator_name = self.models
        return {
            "conversation_id": self.chat.conversation_id(seed_id, self.models),
            "seed_id": seed_id,
            "messages": state.messages,
            "num_turns": sum(m["role"] == "assistant" for m in state.messages),
            "ended_by": state.ended_by,
            "num_tokens": state.tokens,
            "simulator_model": simulator_name,
            "assistant_model": assistant_name,
            "gates": state.gates,
        }


@dataclass
class _State:
    seed: dict
    messages: list[Message]
    tokens: int = 0
    ended_by: str | None = None
    gates: list[dict] = field(default_factory=list)
    spent: list[int] = field(default_factory=lambda: [0])  # tokens spent when each message was added
    seed_shift: int = 0
    origin: tuple[int, int] | None = None  # a branch's (conversation index, prefix length)

    @property
    def live(self) -> bool:
        return self.ended_by is None

    def add(self, role: str, content: str, num_tokens: int) -> None:
        self.messages.append(Message(role=role, content=content))
        self.tokens += num_tokens
        self.spent.append(self.tokens)
