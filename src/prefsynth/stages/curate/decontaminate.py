"""Decontamination: the Tulu 3 n-gram rule, in process, with a numpy index of the eval sets.

The rule. Prompt and eval instance are tokenized alike (``tokenize.words``). A token of an
eval instance is *covered* by a prompt when it lies inside an n-gram of that instance which
also occurs in one of the prompt's user turns. A prompt is removed when, for some single eval
instance, more than ``threshold`` of the instance's tokens are covered (or all of them, so
that ``threshold: 1`` still removes full copies). An instance shorter than n tokens has no
n-gram: it matches (coverage 1) when its whole token sequence appears in a user turn, and one
shorter than ``MIN_SHORT_TOKENS`` is skipped (three words or fewer occur everywhere). The
match recorded is the instance with the highest coverage, the first in eval order on a tie.

How. Eval tokens get ids from a vocabulary built over the eval sets (a prompt token outside
it can be in no eval n-gram, so it becomes 0, which no n-gram may contain). Each n-gram of
ids is hashed to a uint64 by a fixed polynomial (the same in every process: no salted
``hash``), and the index is three arrays sorted by hash: hash, instance, start position, 16
bytes per eval n-gram. A batch of prompts is hashed in one pass, looked up with
``searchsorted``, and the coverage of every (prompt, instance) pair sharing an n-gram is
counted from the matched start positions. A pair over the threshold is then checked exactly
on the tokens, so a hash collision can never remove a prompt: the result equals the
plain-Python definition in ``reference.py``.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from prefsynth.stages.curate.evals import EvalSet
from prefsynth.stages.curate.tokenize import words

MIN_SHORT_TOKENS = 4
_U64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _multipliers(n: int) -> np.ndarray:
    """Fixed odd 64-bit constants, one per position in the n-gram."""
    return np.array([_splitmix(k) | 1 for k in range(n)], dtype=np.uint64)


def window_hashes(ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The uint64 hash of every ``width``-token window of ``ids`` and the indices of the
    windows free of id 0 (separators and tokens outside the eval vocabulary)."""
    m = len(ids) - width + 1
    if m <= 0:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    mult = _multipliers(width)
    h = ids[:m] * mult[0]
    for k in range(1, width):
        h += ids[k:k + m] * mult[k]
    h ^= h >> np.uint64(29)  # mix, so the top bits (the filter's slot) depend on every id
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    zeros = np.concatenate(([0], np.cumsum(ids == 0)))
    return h, np.flatnonzero(zeros[width:width + m] == zeros[:m])


@dataclass(slots=True)
class _Grams:
    """The index for one window width: sorted hashes, their instance and start position, and
    a one-byte-per-slot filter (8 to 16 slots per n-gram, addressed by a hash's top bits)
    that turns most prompt n-grams away before the binary search."""

    hashes: np.ndarray  # uint64
    inst: np.ndarray  # int32
    pos: np.ndarray  # int32
    filter: np.ndarray = field(init=False)
    shift: np.uint64 = field(init=False)

    def __post_init__(self) -> None:
        bits = max(int(len(self.hashes) * 8).bit_length(), 10)
        self.shift = np.uint64(64 - bits)
        self.filter = np.zeros(1 << bits, dtype=bool)
        self.filter[self.hashes >> self.shift] = True

    @property
    def nbytes(self) -> int:
        return int(self.hashes.nbytes + self.inst.nbytes + self.pos.nbytes + self.filter.nbytes)


@dataclass(slots=True)
class Match:
    """The eval instance a prompt overlaps most, and the share of its tokens covered."""

    eval_set: str
    eval_id: str
    ratio: float


@dataclass(slots=True)
class EvalIndex:
    """Every eval instance's n-grams, searchable by hash. Built once, then read-only: on a
    cluster it is what each worker receives while the prompts are split among them."""

    n: int
    threshold: float
    vocab: dict[bytes, int]
    set_names: list[str]
    set_of: np.ndarray  # int16: instance -> index into set_names
    ids: list[str]  # instance -> its id in its eval set
    lengths: np.ndarray  # int32: real tokens per instance
    tokens: np.ndarray  # int32: every instance's token ids, turns and instances split by 0
    offsets: np.ndarray  # int64: instance i is tokens[offsets[i]:offsets[i + 1] - 1]
    grams: dict[int, _Grams]  # window width -> index (n; shorter widths for short instances)
    instances: Counter[str] = field(default_factory=Counter)  # set -> instances indexed
    ngrams: Counter[str] = field(default_factory=Counter)  # set -> n-grams indexed
    short: Counter[str] = field(default_factory=Counter)  # set -> matched by containment
    skipped: Counter[str] = field(default_factory=Counter)  # set -> too short to match

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (the vocabulary dict is counted apart: ``vocab_bytes``)."""
        arrays = sum(g.nbytes for g in self.grams.values())
        return int(arrays + self.tokens.nbytes + self.offsets.nbytes + self.lengths.nbytes
                   + self.set_of.nbytes)

    def instance_turns(self, i: int) -> list[list[int]]:
        seq = self.tokens[self.offsets[i]:self.offsets[i + 1] - 1].tolist()
        turns: list[list[int]] = [[]]
        for t in seq:
            if t == 0:
                turns.append([])
            else:
                turns[-1].append(t)
        return [t for t in turns if t]


def build_index(sets: Sequence[EvalSet], n: int, threshold: float) -> EvalIndex:
    """Tokenize every eval instance and index its n-grams (short instances: their whole
    sequence as one window)."""
    vocab: dict[bytes, int] = {}
    flat = array("i")  # 4 bytes a token while building, not a Python int each
    offsets = [0]
    lengths: list[int] = []
    set_of: list[int] = []
    ids: list[str] = []
    idx = EvalIndex(n, threshold, vocab, [s.name for s in sets], np.empty(0, np.int16), ids,
                    np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.int64), {})
    for si, s in enumerate(sets):
        for eid, turns in zip(s.ids, s.texts, strict=True):
            toks: list[bytes | None] = [w for t in turns for w in [*words(t), None]][:-1]
            real = [w for w in toks if w is not None]  # toks: None between turns
            if not real:
                continue
            if len(real) < n:
                if len(real) < MIN_SHORT_TOKENS:
                    idx.skipped[s.name] += 1
                    continue
                toks = list(real)  # matched as one window: turns joined
                idx.short[s.name] += 1
            flat.extend(0 if w is None else vocab.setdefault(w, len(vocab) + 1) for w in toks)
            flat.append(0)
            offsets.append(len(flat))
            lengths.append(len(real))
            set_of.append(si)
            ids.append(eid)
            idx.instances[s.name] += 1
    idx.tokens = np.frombuffer(flat, dtype=np.int32).copy()
    del flat
    idx.offsets = np.array(offsets, dtype=np.int64)
    idx.lengths = np.array(lengths, dtype=np.int32)
    idx.set_of = np.array(set_of, dtype=np.int16)
    _index_grams(idx)
    return idx


def _index_grams(idx: EvalIndex) -> None:
    """Fill ``idx.grams``: width n for long instances, width L for instances of L < n."""
    toks = idx.tokens.astype(np.uint64)
    starts = idx.offsets[:-1]
    for width in sorted({idx.n, *(int(x) for x in idx.lengths if x < idx.n)}):
        h, ok = window_hashes(toks, width)
        inst = np.searchsorted(starts, ok, side="right") - 1
        keep = idx.lengths[inst] >= idx.n if width == idx.n else idx.lengths[inst] == width
        ok, inst = ok[keep], inst[keep]
        order = np.argsort(h[ok], kind="stable")
        idx.grams[width] = _Grams(h[ok][order], inst[order].astype(np.int32),
                                  (ok - starts[inst])[order].astype(np.int32))
        if width == idx.n:
            for si, c in zip(*np.unique(idx.set_of[inst], return_counts=True), strict=True):
                idx.ngrams[idx.set_names[si]] += int(c)


def coverage(prompt_turns: Sequence[Sequence[Hashable]], inst_turns: Sequence[Sequence[Hashable]],
             n: int) -> float:
    """The exact share of an instance's tokens covered by n-grams a prompt shares with it
    (token ids; a short instance: 1.0 when contained in a turn, else 0.0)."""
    length = sum(len(t) for t in inst_turns)
    if length < n:
        seq = [x for t in inst_turns for x in t]
        for turn in prompt_turns:
            if any(list(turn[i:i + length]) == seq for i in range(len(turn) - length + 1)):
                return 1.0
        return 0.0
    grams = {tuple(t[i:i + n]) for t in prompt_turns for i in range(len(t) - n + 1)}
    covered = 0
    for t in inst_turns:
        mask = bytearray(len(t))
        for i in range(len(t) - n + 1):
            if tuple(t[i:i + n]) in grams:
                mask[i:i + n] = b"\x01" * n
        covered += sum(mask)
    return covered / length


def over(ratio: float, threshold: float) -> bool:
    """The removal test: more than ``threshold`` covered, or the whole instance."""
    return ratio > threshold or ratio >= 1.0


def scan(idx: EvalIndex, prompts: Sequence[Sequence[Sequence[bytes]]]) -> list[Match | None]:
    """For each prompt (its user turns, tokenized), the eval instance it overlaps past the
    threshold, or None."""
    get = idx.vocab.get
    flat: list[int] = []
    sizes: list[int] = []
    for turns in prompts:
        before = len(flat)
        for toks in turns:
            flat.extend(map(get, toks, repeat(0)))
            flat.append(0)
        sizes.append(len(flat) - before)
    ids = np.array(flat, dtype=np.uint64)
    owner = np.repeat(np.arange(len(prompts), dtype=np.int64), sizes)
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    candidates: dict[int, set[int]] = {}
    for width, g in idx.grams.items():
        for p, inst in _over_threshold(idx, g, width, ids, owner):
            candidates.setdefault(p, set()).add(inst)
    out: list[Match | None] = [None] * len(prompts)
    for p, insts in candidates.items():
        out[p] = _best(idx, _split(flat[bounds[p]:bounds[p + 1]]), insts)
    return out


def _over_threshold(idx: EvalIndex, g: _Grams, width: int, ids: np.ndarray,
                    owner: np.ndarray) -> list[tuple[int, int]]:
    """(prompt, instance) pairs whose hashed coverage passes the threshold."""
    if not len(g.hashes):
        return []
    h, ok = window_hashes(ids, width)
    ok = ok[g.filter[h[ok] >> g.shift]]
    hv = h[ok]
    lo = np.searchsorted(g.hashes, hv, side="left")
    hit = np.flatnonzero(g.hashes[np.minimum(lo, len(g.hashes) - 1)] == hv)
    if not len(hit):
        return []
    lo = lo[hit]
    cnt = np.searchsorted(g.hashes, hv[hit], side="right") - lo
    total = int(cnt.sum())
    first = np.repeat(np.cumsum(cnt) - cnt, cnt)
    entry = np.repeat(lo, cnt) + (np.arange(total) - first)
    own = np.repeat(owner[ok[hit]], cnt)
    inst = g.inst[entry].astype(np.int64)
    pos = g.pos[entry].astype(np.int64)
    # sort by (prompt, instance, start); per pair, each start covers up to the next start
    order = np.lexsort((pos, inst, own))
    own, inst, pos = own[order], inst[order], pos[order]
    same = (own[1:] == own[:-1]) & (inst[1:] == inst[:-1])
    gap = np.diff(pos)
    contrib = np.append(np.where(same, np.minimum(gap, width), width), width)
    starts = np.flatnonzero(np.insert(~same, 0, True))
    covered = np.add.reduceat(contrib, starts)
    own, inst = own[starts], inst[starts]
    ratio = covered / idx.lengths[inst]
    sel = (ratio > idx.threshold) | (ratio >= 1.0)
    return list(zip(own[sel].tolist(), inst[sel].tolist(), strict=True))


def _split(seq: list[int]) -> list[list[int]]:
    """A prompt's id sequence back into turns (0 ends a turn; unknown tokens are 0 too,
    and an n-gram cannot span them either)."""
    turns: list[list[int]] = [[]]
    for t in seq:
        if t == 0:
            turns.append([])
        else:
            turns[-1].append(t)
    return [t for t in turns if t]


def _best(idx: EvalIndex, turns: list[list[int]], insts: set[int]) -> Match | None:
    best: tuple[float, int] | None = None
    for i in sorted(insts):
        r = coverage(turns, idx.instance_turns(i), idx.n)
        if over(r, idx.threshold) and (best is None or r > best[0]):
            best = (r, i)
    if best is None:
        return None
    r, i = best
    return Match(idx.set_names[int(idx.set_of[i])], idx.ids[i], r)
