"""Quality gates on generated text: cheap checks that catch what a small model gets wrong in self-chat.

Seen in `make demo` output before these gates: the simulated user copying the assistant's answer word
for word, asking the same question twice, or narrating ("The user explains that ..."); candidate
replies that just repeat the user's question; and critique revisions that open with the critic's own
meta-text ("The response is clear and concise, but … Here's a revised version:"). Each check returns the
gate's name or None, so callers can count and keep every decision with its reason.
"""

from __future__ import annotations

import difflib
import re

ECHO_THRESHOLD = 0.5
ECHO_MIN_KEPT = 0.8  # a reply echoes the question when it keeps at least this share of its words in order …
ECHO_MAX_ADDED_WORDS = 2  # … and adds at most this many words of its own
REPEAT_THRESHOLD = 0.8
MIN_WORDS = 4
_WORD = re.compile(r"\w+", re.UNICODE)
_NARRATION = re.compile(
    r"^\W*(the|this) (user|assistant)\b|\bthe (user|assistant) (is|was|says|said|asks|asked|explains|explained|"
    r"wants|wanted|responds|responded|replies|replied|thanks|thanked|would|provides|mentions|continues)\b",
    re.IGNORECASE,
)
_REVISION_LABEL = re.compile(
    r"(?:\b(?:here(?:'s| is)|below is)\b[^:\n]{0,80}?\b(?:revis|rewr|updat|correct|improv|edit)\w*[^:\n]{0,40}"
    r"|^\W*(?:revised|rewritten|updated|corrected|improved|edited) (?:response|version|answer|reply|text)\W*?)"
    r":[ \t]*\**",
    re.IGNORECASE | re.MULTILINE,
)
_SELF_TALK = re.compile(
    r"^\W*(?:(?:the|this|your|my) (?:original |revised |previous |above |initial )?(?:response|answer|reply|revision)"
    r"\b[^.!?\n]*\b(?:clear|concise|accurate|inaccura\w*|improv\w*|revis\w*|claims?|correct\w*|well[- ]written|"
    r"informative|helpful|contains?|needs?|lacks?)\b"
    r"|i(?:'ve| have)? (?:revised|removed|rewritten|rewrote|corrected|updated|edited|made)\b"
    r"|(?:note|explanation|changes(?: made)?)\s*:)",
    re.IGNORECASE,
)
REVISION_SELF_TALK = "revision_talks_about_itself"


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def containment(text: str, source: str, n: int = 3) -> float:
    """Share of `text`'s word n-grams that also occur in `source` (1.0: every phrase was copied)."""
    grams = _ngrams(words(text), n)
    if not grams:
        return 0.0
    return len(grams & _ngrams(words(source), n)) / len(grams)


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[k:k + n]) for k in range(len(tokens) - n + 1)}


def repeats(text: str, source: str, threshold: float) -> bool:
    """Whether `text` mostly repeats `source`: the same words, or (from MIN_WORDS words on) at least
    `threshold` of its word trigrams copied from it."""
    mine = words(text)
    if mine == words(source):
        return True
    return len(mine) >= MIN_WORDS and containment(text, source) >= threshold


def user_turn_gate(text: str | None, messages: list[dict], echo_threshold: float = ECHO_THRESHOLD,
                   repeat_threshold: float = REPEAT_THRESHOLD) -> str | None:
    """Why a simulated-user turn is unusable (`empty`, `echoes_assistant`, `repeats_user`, `narrates`),
    or None. `messages` is the conversation so far, ending in the assistant turn it answers."""
    if not text or not words(text):
        return "empty"
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    if assistant and repeats(text, assistant[-1], echo_threshold):
        return "echoes_assistant"
    if any(repeats(text, m["content"], repeat_threshold) for m in messages if m["role"] == "user"):
        return "repeats_user"
    if _NARRATION.search(text):
        return "narrates"
    return None


def reply_gate(reply: str, context: list[dict]) -> str | None:
    """Why a candidate reply is unusable (`empty_reply`, `echoes_user`), or None."""
    if not words(reply):
        return "empty_reply"
    users = [m["content"] for m in context if m["role"] == "user"]
    if users and echoes(reply, users[-1]):
        return "echoes_user"
    return None


def echoes(reply: str, question: str) -> bool:
    """Whether `reply` is `question` given back: its very words, or the question asked again (most of its
    words in order, and a "?") with at most a word or two added. A well-formed answer often restates the
    question ("You have to drive on the right side of the road.", "Yes, there are real psychics in the
    world.") but states what it adds, so shared phrases alone do not make an echo."""
    mine, theirs = words(reply), words(question)
    if not theirs or mine == theirs:
        return bool(theirs)
    matcher = difflib.SequenceMatcher(None, theirs, mine, autojunk=False)
    kept = sum(block.size for block in matcher.get_matching_blocks())
    asked_again = kept >= ECHO_MIN_KEPT * len(theirs) and "?" in reply
    return asked_again and len(mine) - kept <= ECHO_MAX_ADDED_WORDS


def revision_text(text: str) -> tuple[str, str | None]:
    """A critique revision without the critic's meta-text: what follows a "Here's a revised version:" label,
    minus closing paragraphs about the changes. `("", REVISION_SELF_TALK)` when what is left still talks
    about the response instead of being one, so that text never becomes a reply."""
    label = _REVISION_LABEL.search(text)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text[label.end():] if label else text) if p.strip()]
    while paragraphs and _SELF_TALK.search(paragraphs[-1]) and len(paragraphs) > 1:
        paragraphs.pop()
    if paragraphs and _SELF_TALK.search(paragraphs[0]):
        return "", REVISION_SELF_TALK
    return _unquoted("\n\n".join(paragraphs)), None


def _unquoted(text: str) -> str:
    return text[1:-1].strip() if len(text) > 1 and text[0] == text[-1] == '"' else text
