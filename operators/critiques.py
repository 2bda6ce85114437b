"""FenCE-style claim-level critiques, revision and factuality scores (FenCE, 2024).

Each round, for every response at once: split it into claims (JSON-schema structured output); judge each
claim against evidence (the seed's source documents plus passages retrieved from a local collection) with
a written critique and a label (supported / contradicted / unverifiable); score = weighted share of the
claims. Then revise: contradicted claims are fixed using their critique; for unverifiable ones the
generator is asked, without evidence, whether the claim is true, and the claim is deleted unless it answers
"true". Evidence longer than `max_evidence_tokens` is narrowed to its passages most relevant to the claim, so
one long source document cannot push a prompt past the model's context. The revised response is judged again
in the next round, up to `rounds` revisions. A model output that does not parse never fails the batch: the
field is null, the raw output and the reason are kept. A request that does not fit the model's context window
(`PROMPT_TOO_LONG`) is such a failure too, with that reason; a candidate that was never sampled for that reason
is not critiqued. A revision is gated like a self-chat turn: the critic's preamble ("The response is clear …
Here's a revised version:") is cut off, and a revision that only talks about the response is not taken (its
flagged claims are removed without the model, with the reason on each claim).
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pyarrow as pa

from prefmill.operators.gates import revision_text
from prefmill.operators.retrieval import DocumentIndex, tokens
from prefmill.schemas.config import CritiquesSection
from prefmill.schemas.tables import CRITIQUES
from prefmill.serving.protocols import PROMPT_TOO_LONG, Completion, Conversation, LanguageModel, Message, Sampling

VERDICTS = ("supported", "contradicted", "unverifiable")
# String lengths are bounded in the schemas: a small model at temperature 0 can loop inside a string until
# max_tokens cuts the JSON open (measured: 57% unparsed verdicts without the bounds).
CLAIMS_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["claims"],
                 "properties": {"claims": {"type": "array", "maxItems": 6,
                                           "items": {"type": "string", "minLength": 3, "maxLength": 150}}}}
VERDICT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["critique", "verdict"],
                  "properties": {"critique": {"type": "string", "maxLength": 300},
                                 "verdict": {"enum": list(VERDICTS)}}}
KNOWS_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer"],
                "properties": {"answer": {"enum": ["true", "false", "unknown"]}}}
PASSAGE_CHARS = 600  # the longest passage a long evidence text is cut into
TOO_LONG = f"{PROMPT_TOO_LONG}: the request does not fit the model's context window"


TokenCount = Callable[[Sequence[str]], list[int]]


@dataclass(frozen=True)
class Parsed:
    value: Any
    error: str | None
    raw: str


def claims_prompt(question: str, response: str) -> Conversation:
    return [Message(role="system", content="Split the response into short, self-contained factual claims. "
                                           'Answer with JSON: {"claims": ["...", ...]}.'),
            Message(role="user", content=f"Question: {question}\n\nResponse: {response}")]


def verdict_prompt(claim: str, evidence: list[str]) -> Conversation:
    sources = "\n".join(f"[{k + 1}] {e}" for k, e in enumerate(evidence)) or "(no evidence found)"
    return [Message(role="system", content="You check one claim against the evidence. Write a short critique "
                                           "quoting the evidence, then a verdict: supported (the evidence says "
                                           "so), contradicted (the evidence says otherwise) or unverifiable. "
                                           'Answer with JSON: {"critique": "...", "verdict": "..."}.'),
            Message(role="user", content=f"Evidence:\n{sources}\n\nClaim: {claim}")]


def knows_prompt(claim: str) -> Conversation:
    return [Message(role="system", content="Without looking anything up, is this claim true? Answer 'unknown' "
                                           'unless you are sure. Answer with JSON: {"answer": "true|false|unknown"}.'),
            Message(role="user", content=claim)]


def revise_prompt(question: str, response: str, fixes: list[tuple[str, str]], removals: list[str]) -> Conversation:
    lines = [f"- Fix: \"{c}\" Critique: {k}" for c, k in fixes] + [f"- Remove: \"{c}\"" for c in removals]
    return [Message(role="system", content="Revise the response. Apply every listed change, keep everything "
                                           "else as it is, and answer with the revised response only."),
            Message(role="user", content=f"Question: {question}\n\nResponse: {response}\n\nChanges:\n"
                                         + "\n".join(lines))]


def parse_json(raw: str, key: str, check) -> Parsed:
    """The `key` field of a JSON object in `raw` when `check(value)` holds; else null with the reason."""
    text = raw.strip()
    match = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        data = json.loads(match.group(0) if match else text)
    except json.JSONDecodeError as exc:
        return Parsed(None, f"malformed JSON at column {exc.colno}: {exc.msg}", raw)
    if not isinstance(data, dict) or key not in data:
        return Parsed(None, f"JSON has no '{key}' field", raw)
    if not check(data[key]):
        return Parsed(None, f"bad value for '{key}': {str(data[key])[:80]!r}", raw)
    return Parsed(data, None, raw)


def parse_claims(raw: str) -> Parsed:
    parsed = parse_json(raw, "claims", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v))
    if parsed.error:
        return parsed
    claims = list(dict.fromkeys(c.strip() for c in parsed.value["claims"] if c.strip()))
    return Parsed(claims, None, raw)


def parse_verdict(raw: str) -> Parsed:
    parsed = parse_json(raw, "verdict", lambda v: v in VERDICTS)
    if parsed.error:
        return parsed
    return Parsed((parsed.value["verdict"], str(parsed.value.get("critique", "")).strip()), None, raw)


def parse_knows(raw: str) -> Parsed:
    parsed = parse_json(raw, "answer", lambda v: v in ("true", "false", "unknown"))
    return parsed if parsed.error else Parsed(parsed.value["answer"], None, raw)


def parse_output(completion: Completion, parse: Callable[[str], Parsed]) -> Parsed:
    """`parse` of the completion's text; a request the model could not take (its prompt did not fit the
    context window) is a failure with that reason, not a parse error of an empty output."""
    if completion.finish_reason == PROMPT_TOO_LONG:
        return Parsed(None, TOO_LONG, completion.text)
    return parse(completion.text)


def remove_verbatim(response: str, claim: str) -> str:
    """Drop the sentence holding `claim` when the claim appears word for word (the fallback of edit-or-remove)."""
    if claim not in response:
        return response
    sentences = _sentences(response)
    return " ".join(s for s in sentences if claim not in s).strip() or response.replace(claim, "").strip()


def remove_closest_sentence(response: str, claim: str) -> str:
    """Drop the sentence sharing the most words with `claim` (when a requested edit changed nothing)."""
    words = set(tokens(claim))
    sentences = _sentences(response)
    overlaps = [len(words & set(tokens(s))) for s in sentences]
    if not overlaps or max(overlaps) == 0:
        return response
    drop = overlaps.index(max(overlaps))
    return " ".join(s for k, s in enumerate(sentences) if k != drop).strip()


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def utf8_bytes(texts: Sequence[str]) -> list[int]:
    """Token counts' fallback: UTF-8 bytes, an upper bound for byte-level BPE tokenizers (each token is at
    least one byte), so a budget in these units holds for the model whatever its tokenizer."""
    return [len(t.encode("utf-8")) for t in texts]


def token_counter(lm: LanguageModel) -> TokenCount:
    """The model's own `count_tokens` (the optional `TokenCounter` capability) or the UTF-8 fallback,
    memoised: every claim of a response is judged against the same source documents."""
    count = getattr(lm, "count_tokens", None) or utf8_bytes
    cache: dict[str, int] = {}

    def counted(texts: Sequence[str]) -> list[int]:
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, count(missing), strict=True))
        return [cache[t] for t in texts]
    return counted


def split_passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
    """`text` as consecutive passages of at most `size` characters, cut between sentences (between words
    inside a longer sentence)."""
    passages: list[str] = []
    for piece in (p for s in _sentences(text) for p in textwrap.wrap(s, size, break_on_hyphens=False)):
        if passages and len(passages[-1]) + 1 + len(piece) <= size:
            passages[-1] += " " + piece
        else:
            passages.append(piece)
    return passages


def fit_evidence(claim: str, evidence: list[str], budget: int, count: TokenCount) -> list[str]:
    """`evidence` whole when it fits `budget` tokens. Otherwise only the passages chosen to fit (see
    `_choose_passages`); each source keeps its chosen passages in their order, joined by " … ". A passage
    has at most budget/4 characters, so one fits even under the byte fallback with four-byte characters.
    The "[k] " numbering and the separators add a few tokens beyond the budget."""
    if sum(count(evidence)) <= budget:
        return evidence
    split = [split_passages(e, max(min(PASSAGE_CHARS, budget // 4), 1)) for e in evidence]
    chosen, fitted = _choose_passages(claim, split, budget, count), []
    for passages in split:
        mine = list(dict.fromkeys(p for p in passages if p in chosen))
        chosen.difference_update(mine)
        fitted += [" … ".join(mine)] if mine else []
    return fitted


def _choose_passages(claim: str, split: list[list[str]], budget: int, count: TokenCount) -> set[str]:
    """Passages that fit `budget` together: those sharing words with the claim first (BM25), then the
    sources' opening passages in turn (every source's first, then every second, ...)."""
    openings = [p for _, _, p in sorted((i, k, p) for k, ps in enumerate(split) for i, p in enumerate(ps))]
    unique = list(dict.fromkeys(openings))
    sizes = dict(zip(unique, count(unique), strict=True))
    chosen, left = set(), budget
    for passage in dict.fromkeys(DocumentIndex(unique).search(claim, len(unique)) + unique):
        if sizes[passage] <= left:
            chosen.add(passage)
            left -= sizes[passage]
    return chosen


_DEFAULTS = CritiquesSection()  # the config section holds every default: one definition


@dataclass(frozen=True)
class ClaimCritic:
    """`__call__(candidates, lm, documents_by_seed, index)` → a `critiques` table."""

    rounds: int = _DEFAULTS.rounds
    weights: dict[str, float] = field(default_factory=lambda: {"supported": 1.0, "contradicted": 0.0,
                                                               "unverifiable": 0.0})
    evidence_k: int = _DEFAULTS.evidence_k
    max_evidence_tokens: int = _DEFAULTS.max_evidence_tokens
    max_tokens: int = _DEFAULTS.max_tokens
    temperature: float = 0.0
    seed: int = _DEFAULTS.seed

    def __call__(self, candidates: list[dict], lm: LanguageModel, documents_by_seed: dict[str, list[str]] | None = None,
                 index: DocumentIndex | None = None) -> pa.Table:
        docs = documents_by_seed or {}
        states = [_Critique(c, c["reply"], docs.get(c.get("seed_id"), [])) for c in candidates]
        for state in states:
            if state.candidate.get("finish_reason") == PROMPT_TOO_LONG:
                state.never_sampled()
        count = token_counter(lm)
        for round_no in range(self.rounds + 1):
            live = [s for s in states if s.live]
            if not live:
                break
            self._judge(live, lm, index, round_no, count)
            if round_no < self.rounds:
                self._revise([s for s in live if s.flagged()], lm)
                for s in live:
                    s.live = s.live and s.revised_this_round
        return pa.Table.from_pylist([s.row(lm.name) for s in states], schema=CRITIQUES)

    def _chat(self, prompts: list[Conversation], lm: LanguageModel, schema: dict | None) -> list[Completion]:
        if not prompts:
            return []
        sampling = Sampling(n=1, temperature=self.temperature, top_p=1.0, max_tokens=self.max_tokens, seed=self.seed,
                            json_schema=schema)
        return [c[0] for c in lm.chat(prompts, sampling)]

    def _judge(self, states: list[_Critique], lm: LanguageModel, index: DocumentIndex | None, round_no: int,
               count: TokenCount) -> None:
        raws = self._chat([claims_prompt(s.question, s.response) for s in states], lm, CLAIMS_SCHEMA)
        for state, raw in zip(states, raws):
            state.start_round(round_no, parse_output(raw, parse_claims))
        pending = [(s, claim) for s in states for claim in s.current["claims"]]
        claims = [c["claim"] for _, c in pending]
        evidence = self.fit([self._evidence(s, c["claim"], index) for s, c in pending], claims, count)
        verdicts = self._verdicts(claims, evidence, lm)
        for (state, claim), ev, verdict in zip(pending, evidence, verdicts):
            state.set_verdict(claim, verdict, ev)
        for state in states:
            state.finish_round(self.weights)

    def judge(self, claims: list[str], evidence: list[list[str]], lm: LanguageModel) -> list[Parsed]:
        """The evaluator alone: a (verdict, critique) per claim against its evidence (fitted to
        `max_evidence_tokens`), or null + reason."""
        return self._verdicts(claims, self.fit(evidence, claims, token_counter(lm)), lm)

    def fit(self, evidence: list[list[str]], claims: list[str], count: TokenCount) -> list[list[str]]:
        """Each claim's evidence within `max_evidence_tokens` (see `fit_evidence`)."""
        return [fit_evidence(c, e, self.max_evidence_tokens, count) for c, e in zip(claims, evidence, strict=True)]

    def _verdicts(self, claims: list[str], evidence: list[list[str]], lm: LanguageModel) -> list[Parsed]:
        outputs = self._chat([verdict_prompt(c, e) for c, e in zip(claims, evidence, strict=True)], lm,
                             VERDICT_SCHEMA)
        return [parse_output(raw, parse_verdict) for raw in outputs]

    def _evidence(self, state: _Critique, claim: str, index: DocumentIndex | None) -> list[str]:
        found = index.search(claim, self.evidence_k) if index else []
        return list(dict.fromkeys(state.documents + found))

    def _revise(self, states: list[_Critique], lm: LanguageModel) -> None:
        unverifiable = [(s, c) for s in states for c in s.current["claims"] if c["verdict"] == "unverifiable"]
        answers = self._chat([knows_prompt(c["claim"]) for _, c in unverifiable], lm, KNOWS_SCHEMA)
        for (state, claim), raw in zip(unverifiable, answers):
            known = parse_output(raw, parse_knows)
            state.count_call(known)
            if known.error == TOO_LONG:
                claim["error"] = f"knows: {TOO_LONG}; the claim is removed"
            claim["action"] = "keep" if known.value == "true" else "remove"  # false, unknown or unparsed
        for state in states:
            for claim in state.current["claims"]:
                if claim["verdict"] == "contradicted":
                    claim["action"] = "fix"
        todo = [s for s in states if s.changes()]
        revised = self._chat([revise_prompt(s.question, s.response, *s.changes()) for s in todo], lm, None)
        for state, out in zip(todo, revised):
            state.count_call()
            text, problem = ("", TOO_LONG) if out.finish_reason == PROMPT_TOO_LONG else revision_text(out.text)
            if problem:
                state.note_edited(f"revise: {problem}; the claim was removed without the model")
            state.apply_revision(text)


@dataclass
class _Critique:
    candidate: dict
    response: str
    documents: list[str]
    rounds: list[dict] = field(default_factory=list)
    failures: int = 0
    calls: int = 0
    live: bool = True
    revised_this_round: bool = False

    @property
    def question(self) -> str:
        users = [m["content"] for m in self.candidate["context"] if m["role"] == "user"]
        return users[-1] if users else ""

    @property
    def current(self) -> dict:
        return self.rounds[-1]

    def count_call(self, parsed: Parsed | None = None) -> None:
        """One model call made for this response; `parsed` when its output is parsed (revisions are text)."""
        self.calls += 1
        self.failures += parsed is not None and parsed.error is not None

    def start_round(self, round_no: int, parsed: Parsed) -> None:
        self.count_call(parsed)
        self.revised_this_round = False
        claims = [{"claim": c, "verdict": None, "critique": None, "evidence": None, "action": None,
                   "raw_output": None, "error": None} for c in (parsed.value or [])]
        self.rounds.append({"round": round_no, "response": self.response, "claims": claims, "score": None,
                            "raw_output": parsed.raw if parsed.error else None, "error": parsed.error})

    def set_verdict(self, claim: dict, parsed: Parsed, evidence: list[str]) -> None:
        self.count_call(parsed)
        claim["evidence"] = "\n".join(evidence)
        if parsed.error:
            claim.update(raw_output=parsed.raw, error=parsed.error)
        else:
            claim["verdict"], claim["critique"] = parsed.value

    def never_sampled(self) -> None:
        """A candidate whose context did not fit the model's context window has no reply to critique: one
        empty round says why, and no model call is made."""
        self.live = False
        self.rounds.append({"round": 0, "response": self.response, "claims": [], "score": None,
                            "raw_output": None, "error": f"{PROMPT_TOO_LONG}: the candidate was never sampled"})

    def note_edited(self, reason: str) -> None:
        """Record `reason` on every claim the pending revision changes (those without an error yet)."""
        for claim in self.current["claims"]:
            if claim["action"] in ("fix", "remove") and not claim["error"]:
                claim["error"] = reason

    def finish_round(self, weights: dict[str, float]) -> None:
        judged = [c for c in self.current["claims"] if c["verdict"]]
        if judged:
            self.current["score"] = sum(weights.get(c["verdict"], 0.0) for c in judged) / len(judged)

    def flagged(self) -> bool:
        return any(c["verdict"] in ("contradicted", "unverifiable") for c in self.current["claims"])

    def changes(self) -> tuple[list[tuple[str, str]], list[str]] | None:
        fixes = [(c["claim"], c["critique"] or "") for c in self.current["claims"] if c["action"] == "fix"]
        removals = [c["claim"] for c in self.current["claims"] if c["action"] == "remove"]
        return (fixes, removals) if fixes or removals else None

    def apply_revision(self, text: str) -> None:
        """Take the model's revision; claims it left word for word are removed, and when it changed nothing
        the sentence closest to each claim is removed, so a flagged claim never survives unchanged."""
        edited = [c["claim"] for c in self.current["claims"] if c["action"] in ("fix", "remove")]
        revised = text.strip() or self.response
        for claim in edited:
            revised = remove_verbatim(revised, claim)
        if revised == self.response:
            for claim in edited:
                revised = remove_closest_sentence(revised, claim)
        self.response = revised
        self.revised_this_round = True

    def row(self, model: str) -> dict:
        scores = [r["score"] for r in self.rounds]
        return {"candidate_id": self.candidate["candidate_id"], "context_id": self.candidate["context_id"],
                "rounds": self.rounds, "final_response": self.response, "initial_score": scores[0],
                "final_score": scores[-1], "num_parse_failures": self.failures, "num_calls": self.calls,
                "critic_model": model}
