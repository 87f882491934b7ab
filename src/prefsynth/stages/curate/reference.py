"""The decontamination rule written plainly in Python: tuples of words in a dict, no hashing.

Slow (a dict entry per eval n-gram, a tuple per prompt n-gram), and kept only as the
definition the fast ``decontaminate.scan`` is tested and benchmarked against: on the same
prompts and eval sets both must give the same matches, ratios included.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefsynth.stages.curate.decontaminate import MIN_SHORT_TOKENS, Match, coverage, over
from prefsynth.stages.curate.evals import EvalSet
from prefsynth.stages.curate.tokenize import words_regex


class ReferenceIndex:
    def __init__(self, sets: Sequence[EvalSet], n: int, threshold: float) -> None:
        self.n, self.threshold = n, threshold
        self.instances: list[tuple[str, str, list[list[bytes]]]] = []
        self.index: dict[tuple[bytes, ...], set[int]] = {}
        self.widths: set[int] = set()
        for s in sets:
            for eid, texts in zip(s.ids, s.texts, strict=True):
                turns = [t for t in (words_regex(x) for x in texts) if t]
                length = sum(len(t) for t in turns)
                if length == 0 or length < min(n, MIN_SHORT_TOKENS):
                    continue
                if length < n:
                    turns = [[w for t in turns for w in t]]
                width = min(n, length)
                self.widths.add(width)
                i = len(self.instances)
                self.instances.append((s.name, eid, turns))
                for t in turns:
                    for j in range(len(t) - width + 1):
                        self.index.setdefault(tuple(t[j:j + width]), set()).add(i)

    def match(self, texts: Sequence[str]) -> Match | None:
        """The prompt (its user turns) against every instance: the best one over the rule."""
        turns = [words_regex(x) for x in texts]
        found: set[int] = set()
        for width in self.widths:
            for t in turns:
                for j in range(len(t) - width + 1):
                    found |= self.index.get(tuple(t[j:j + width]), set())
        best: Match | None = None
        for i in sorted(found):
            name, eid, inst = self.instances[i]
            r = coverage(turns, inst, self.n)
            if over(r, self.threshold) and (best is None or r > best.ratio):
                best = Match(name, eid, r)
        return best
