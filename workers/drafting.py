"""Drafted decisions: guess a row's next choices so that one forward pass can settle several.

A grammar-constrained parse is mostly forced text with a few choices between (a value's first token,
null or not, where a span ends). Decoding a row takes one forward pass per choice, and on a CPU a pass
over a handful of rows costs about as much as the weights it streams, not the tokens it carries. The
choices repeat from query to query: most fields are null in most queries, and a field's value tends
to open the same way. So the engine guesses each choice from what was chosen before at the same place
of the output (``DraftTable``), accepts the guess in the grammar, appends the text it forces, and
guesses on; the row feeds the whole chain in one pass and takes the logits at every guessed position.
Where the model's own (masked, greedy) choice equals the guess it is kept; at the first one that
differs the model's choice replaces it and the rest is thrown away. The output is the greedy output
either way: guesses only decide how many choices one pass settles (prompt-lookup and n-gram drafting
work the same way, with a table of earlier choices in place of a draft model).

Thrown-away tokens need no cleanup in a packed step (``workers.packed``): a row's keys/values live at
its own columns, a token attends only to columns up to its own, and the next step writes the model's
choice over the first thrown-away column.
"""

from __future__ import annotations

import re
from collections import Counter

#: A guess is made only where the same choice was made this many times at that place...
MIN_SEEN = 3
#: ...and in at least this share of the choices made there.
MIN_SHARE = 0.5

_LAST_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:\s*("?)')


def draft_context(written: str) -> tuple[str, bool]:
    """Where in the output a choice falls: the field being written, and whether its value has begun.

    Query words stay out of it on purpose: the context must recur across queries to be learned."""
    matches = list(_LAST_KEY.finditer(written))
    if not matches:
        return "", False
    last = matches[-1]
    return last.group(1), bool(written[last.end() :].strip()) or bool(last.group(2))


class DraftTable:
    """Choices made so far per context; guesses the most frequent one once it clearly leads.

    Not thread-safe: its engine reads and updates it under the engine's lock."""

    def __init__(self, min_seen: int = MIN_SEEN, min_share: float = MIN_SHARE) -> None:
        self.min_seen = min_seen
        self.min_share = min_share
        self._choices: dict[tuple[str, bool], Counter[int]] = {}
        #: Per context: the most frequent choice and the number of choices made there.
        self._leader: dict[tuple[str, bool], int] = {}
        self._made: Counter[tuple[str, bool]] = Counter()
        self._best: dict[tuple[str, bool], int | None] = {}

    def guess(self, context: tuple[str, bool]) -> int | None:
        return self._best.get(context)

    def learn(self, context: tuple[str, bool], token: int) -> None:
        # Once per choice, so kept O(1): a place where spans go on sees thousands of distinct words,
        # and counts only grow, so only the token just counted can overtake the leader.
        seen = self._choices.setdefault(context, Counter())
        seen[token] += 1
        self._made[context] += 1
        leader = self._leader.get(context, token)
        if seen[token] > seen[leader]:
            leader = token
        self._leader[context] = leader
        count = seen[leader]
        confident = count >= self.min_seen and count >= self.min_share * self._made[context]
        self._best[context] = leader if confident else None
