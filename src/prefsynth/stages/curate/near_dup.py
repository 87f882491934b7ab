"""Near-duplicate prompts: MinHash LSH (rensa) over word n-gram shingles of the user turns.

rensa (Rust, MIT) rather than datasketch: on this project's benchmark it signs and indexes
prompts about 30x faster, and its string hashing is fixed (the same signature in every
process). A prompt's shingles are its ``ngram``-word windows over all user turns, tokens as
in ``tokenize.words`` (lowercased words: punctuation and case never separate two prompts);
a prompt shorter than ``ngram`` words is one shingle, a prompt without a word its raw text.

Prompts are taken in input order. Each is looked up in the LSH index of the prompts kept so
far; a candidate counts only when the signatures' estimated Jaccard similarity is at least
``threshold`` (LSH alone lets through pairs well below it), and the earliest such kept
prompt is recorded as the match. Otherwise the prompt is kept and indexed. So the first of
each cluster stays, and feeding the prompts in shards gives the same result as all at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefsynth.config import NearDupSpec
from prefsynth.errors import MissingExtraError

SEED = 0x5EED  # part of every signature: changing it re-derives every near-dup decision


def _rensa() -> Any:
    try:
        import rensa
    except ImportError:
        raise MissingExtraError("near-duplicate removal (curate.near_dup)", "curate") from None
    return rensa


def lsh_bands(threshold: float, num_perm: int, fp_weight: float = 0.2) -> int:
    """Bands b (a divisor of num_perm, r = num_perm / b rows each) minimising the weighted
    area of false positives below the threshold and false negatives above it on the LSH
    S-curve 1 - (1 - s^r)^b. False negatives weigh more: every candidate is verified, so a
    false positive costs only a comparison (0.8 with 128 permutations: 16 bands of 8)."""

    def area(f: Any, lo: float, hi: float, steps: int = 200) -> float:
        w = (hi - lo) / steps
        return sum(f(lo + (i + 0.5) * w) for i in range(steps)) * w

    best: tuple[float, int] | None = None
    for b in (d for d in range(1, num_perm + 1) if num_perm % d == 0):
        r = num_perm // b
        fp = area(lambda s, r=r, b=b: 1 - (1 - s**r) ** b, 0.0, threshold)
        fn = area(lambda s, r=r, b=b: (1 - s**r) ** b, threshold, 1.0)
        err = fp_weight * fp + (1 - fp_weight) * fn
        if best is None or err < best[0]:
            best = (err, b)
    assert best is not None
    return best[1]


def shingles(tokens: Sequence[bytes], n: int, raw: str) -> list[bytes]:
    if not tokens:
        return [raw.encode("utf-8")]
    if len(tokens) <= n:
        return [b" ".join(tokens)]
    return [b" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


class NearDup:
    """The prompts kept so far, indexed. ``check`` a batch at a time, in input order."""

    def __init__(self, spec: NearDupSpec) -> None:
        self.rensa = _rensa()
        self.spec = spec
        self.bands = lsh_bands(spec.threshold, spec.num_perm)
        self.lsh = self.rensa.RMinHashLSH(spec.threshold, spec.num_perm, self.bands)
        self.kept_ids: list[str] = []
        self.kept_sigs: list[Any] = []

    @property
    def facts(self) -> dict[str, Any]:
        return {"threshold": self.spec.threshold, "num_perm": self.spec.num_perm,
                "ngram": self.spec.ngram, "bands": self.bands,
                "rows": self.spec.num_perm // self.bands, "seed": SEED,
                "library": f"rensa {_version('rensa')}"}

    def sign(self, tokens: Sequence[Sequence[bytes]], raws: Sequence[str]) -> list[Any]:
        """MinHash signatures (picklable; the same in every process): the parallel part."""
        sets = [shingles(t, self.spec.ngram, r) for t, r in zip(tokens, raws, strict=True)]
        return list(self.rensa.RMinHash.from_token_sets(sets, self.spec.num_perm, SEED))

    def admit(self, ids: Sequence[str], sigs: Sequence[Any]) -> list[str | None]:
        """For each signed prompt, in input order, the id of the earlier kept prompt it nearly
        copies, or None (it is kept, and later prompts are checked against it)."""
        out: list[str | None] = []
        for pid, sig in zip(ids, sigs, strict=True):
            match = None
            for key in sorted(self.lsh.query(sig)):
                if sig.jaccard(self.kept_sigs[key]) >= self.spec.threshold:
                    match = self.kept_ids[key]
                    break
            if match is None:
                self.lsh.insert(len(self.kept_ids), sig)
                self.kept_ids.append(pid)
                self.kept_sigs.append(sig)
            out.append(match)
        return out

    def check(self, ids: Sequence[str], tokens: Sequence[Sequence[bytes]],
              raws: Sequence[str]) -> list[str | None]:
        return self.admit(ids, self.sign(tokens, raws))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
