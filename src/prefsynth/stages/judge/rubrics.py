"""The judge's prompts: UltraFeedback aspect templates rendered in a Jinja sandbox.

The built-in templates (``prefsynth/stages/judge/templates/*.jinja``) reproduce the text Tulu 3
sent to GPT-4o (allenai/open-instruct ``scripts/synth_pref/utils/ultrafeedback_template.py``,
itself from OpenBMB/UltraFeedback), with the instruction-following numbering bug fixed
(upstream labels the first completion ``<text 2>`` while the format asks for ``Text 1``). The
``*_with_answer`` variants add UltraFeedback's "World Knowledge" section for a reference answer.

Users may add rubrics (``custom_dir``). Templates are code a user hands us, so they are
rendered in :mod:`prefsynth.stages.judge.sandbox` (no Python internals, bounded output, steps
and time), and every failure becomes a one-line :class:`~prefsynth.errors.ConfigError` naming
the file and line. :func:`check_rubrics` renders each one, with and without a reference, before
a run spends anything. Prompt and completion text are passed as values, never compiled, so
``{{`` inside a model answer is just text.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from prefsynth.errors import ConfigError
from prefsynth.stages.judge import sandbox

if TYPE_CHECKING:
    from prefsynth.config import JudgeSpec

BUILTIN_ASPECTS: tuple[str, ...] = (
    "helpfulness",
    "honesty",
    "instruction_following",
    "truthfulness",
)
#: Rating scales of the built-in aspects: UltraFeedback rates 1..5, honesty may answer "N/A".
BUILTIN_SCALES: dict[str, tuple[int, int, bool]] = {
    "helpfulness": (1, 5, False),
    "honesty": (1, 5, True),
    "instruction_following": (1, 5, False),
    "truthfulness": (1, 5, False),
}
_DEFAULT_SCALE = (1, 5, False)
_PACKAGE_DIR = "prefsynth/stages/judge/templates"
_ASPECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_SCALE_KEYS = {"min", "max", "allow_na", "description"}


@dataclass(frozen=True)
class Rubric:
    """One aspect's template and rating scale.

    ``origin`` is where it came from (a file path, or ``package:<name>``) so error messages and
    the dataset card can say which rubric produced a rating.
    """

    aspect: str
    source: str
    origin: str
    lo: int = 1
    hi: int = 5
    allow_na: bool = False
    #: one of the package's own templates: rendered without the sandbox's accounting
    trusted: bool = False

    @property
    def scale(self) -> tuple[int, int, bool]:
        """``(lo, hi, allow_na)``, the tuple the parser and the JSON schema take."""
        return self.lo, self.hi, self.allow_na


def _render(rubric: Rubric, **variables: Any) -> str:
    constant = not sandbox.reads_variables(rubric.source)
    key = (rubric.source, rubric.origin)
    if constant and key in _CONSTANT:
        return _CONSTANT[key]
    if rubric.trusted:
        text = sandbox.render_trusted(rubric.source, rubric.origin, variables)
    else:
        text = sandbox.render(sandbox.compile_template(rubric.source, rubric.origin),
                              rubric.origin, variables)
    if constant and len(_CONSTANT) < 64:
        _CONSTANT[key] = text
    return text


#: the text of templates that read no variable (the built-in system prompt: half of the
#: renders per judge request), rendered once, on the budget of their first render
_CONSTANT: dict[tuple[str, str], str] = {}


def _scale_from_mapping(data: Any, origin: str, default: tuple[int, int, bool]) -> tuple[
        int, int, bool]:
    if data is None:
        return default
    if not isinstance(data, dict):
        raise ConfigError(f"rubric {origin}: scale must be a mapping with min, max, allow_na")
    unknown = set(data) - _SCALE_KEYS
    if unknown:
        raise ConfigError(f"rubric {origin}: unknown key(s) {sorted(unknown)}; "
                          f"allowed: {sorted(_SCALE_KEYS)}")
    lo, hi, na = data.get("min", default[0]), data.get("max", default[1]), data.get(
        "allow_na", default[2])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
        raise ConfigError(f"rubric {origin}: min and max must be integers")
    if not isinstance(na, bool):
        raise ConfigError(f"rubric {origin}: allow_na must be true or false")
    if not lo < hi or hi - lo > 100 or lo < 0:
        raise ConfigError(f"rubric {origin}: need 0 <= min < max <= min + 100, got {lo}..{hi}")
    return lo, hi, na


def _read_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"rubric {origin}: invalid YAML: {str(err).splitlines()[0]}") from None


def _rubric_from_text(aspect: str, text: str, origin: str, sidecar: Path | None) -> Rubric:
    default = BUILTIN_SCALES.get(aspect.removesuffix("_with_answer"), _DEFAULT_SCALE)
    meta: Any = None
    match = _FRONT_MATTER_RE.match(text)
    if match:
        meta = _read_yaml(match.group(1), origin)
        text = text[match.end():]
    if sidecar is not None:
        if match:
            raise ConfigError(f"rubric {origin}: scale given twice (front-matter and {sidecar})")
        meta = _read_yaml(sidecar.read_text(encoding="utf-8"), str(sidecar))
    lo, hi, na = _scale_from_mapping(meta, origin, default)
    return Rubric(aspect, text, origin, lo, hi, na)


def load_rubric(path: str | Path) -> Rubric:
    """Load a user rubric: ``<aspect>.jinja`` whose scale comes from YAML front-matter
    (``---`` / ``min: 1`` / ``max: 10`` / ``allow_na: false`` / ``---``) or a sidecar
    ``<aspect>.yaml``/``.yml``. Without either, the scale is 1..5 (honesty: also N/A).

    Cached on (path, mtime, size): the judge renders one prompt per request, millions of
    times, and must not re-read and re-parse the file each time; an edited file is reloaded.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"rubric file not found: {p}")
    stamps = tuple((s.stat().st_mtime_ns, s.stat().st_size) if s.is_file() else None
                   for s in (p, p.with_suffix(".yaml"), p.with_suffix(".yml")))
    return _load_rubric_cached(str(p), stamps)


@functools.lru_cache(maxsize=256)
def _load_rubric_cached(path: str, stamps: tuple[Any, ...]) -> Rubric:
    p = Path(path)
    aspect = p.name.removesuffix(".jinja")
    sidecars = [s for s in (p.with_suffix(".yaml"), p.with_suffix(".yml")) if s.is_file()]
    if len(sidecars) > 1:
        raise ConfigError(f"rubric {p}: both {sidecars[0].name} and {sidecars[1].name} exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"rubric {p}: cannot read: {err}") from None
    return _rubric_from_text(aspect, text, str(p), sidecars[0] if sidecars else None)


@functools.lru_cache(maxsize=64)
def _builtin(name: str) -> Rubric | None:
    res = importlib.resources.files("prefsynth.stages.judge") / "templates" / f"{name}.jinja"
    if not res.is_file():
        return None
    rubric = _rubric_from_text(name, res.read_text(encoding="utf-8"), f"package:{name}.jinja",
                               None)
    return dataclasses.replace(rubric, trusted=True)


def find_rubric(name: str, custom_dir: str | Path | None = None) -> Rubric | None:
    """The template called ``name``: ``custom_dir`` first (a user may override a built-in),
    then the package. ``None`` when neither has it."""
    if not _ASPECT_RE.match(name):
        raise ConfigError(f"invalid aspect name {name!r}: use letters, digits, '_' and '-'")
    if custom_dir is not None:
        candidate = Path(custom_dir) / f"{name}.jinja"
        if candidate.is_file():
            return load_rubric(candidate)
    return _builtin(name)


def _require(aspect: str, custom_dir: str | Path | None, *, system: bool = False) -> Rubric:
    if aspect == "system" and not system:
        raise ConfigError("'system' names the judge's system prompt (system.jinja), not an aspect")
    rubric = find_rubric(aspect, custom_dir)
    if rubric is None:
        looked = f"{custom_dir} and the built-in {_PACKAGE_DIR}" if custom_dir else _PACKAGE_DIR
        raise ConfigError(f"no template for aspect {aspect!r}: looked for {aspect}.jinja "
                          f"in {looked}")
    return rubric


def aspect_scale(aspect: str, custom_dir: str | Path | None = None) -> tuple[int, int, bool]:
    """``(lo, hi, allow_na)`` for an aspect: 1..5 for the built-ins (honesty allows N/A)."""
    return _require(aspect, custom_dir).scale


def judgment_schema(n: int, allow_na: bool, lo: int = 1, hi: int = 5) -> dict[str, Any]:
    """The JSON schema for structured judge output, ``{"name": "judgment", "schema": ...}``.

    Kept to what both OpenAI strict mode and llama.cpp's grammar converter accept: no
    ``$ref``/``oneOf``, ``additionalProperties: false``, everything required. The rating is a
    plain ``enum`` (no ``type`` when "N/A" is allowed: llama.cpp turns a type list into a
    union *before* it looks at ``enum``). ``rationale`` precedes ``rating`` so the model
    writes its reasoning before committing to a number.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    rating: dict[str, Any] = {"enum": [*range(lo, hi + 1), "N/A"]} if allow_na else {
        "type": "integer", "enum": list(range(lo, hi + 1))}
    item = {
        "type": "object",
        "properties": {
            "text": {"type": "integer", "enum": list(range(1, n + 1))},
            "rationale": {"type": "string"},
            "rating": rating,
        },
        "required": ["text", "rationale", "rating"],
        "additionalProperties": False,
    }
    return {
        "name": "judgment",
        "schema": {
            "type": "object",
            "properties": {
                "ratings": {"type": "array", "items": item, "minItems": n, "maxItems": n},
            },
            "required": ["ratings"],
            "additionalProperties": False,
        },
    }


def _structured_suffix(n: int, lo: int, hi: int, allow_na: bool) -> str:
    na = ' or "N/A"' if allow_na else ""
    return (
        "\n\nInstead of the output format above, answer with one JSON object and nothing else:\n"
        '{"ratings": [{"text": 1, "rationale": "...", "rating": ...}, ...]}\n'
        f"with exactly {n} item(s), one per text in order: \"text\" is the text number (1 to "
        f"{n}), \"rationale\" your rationale in short sentences (include any type "
        f"identification there), and \"rating\" an integer from {lo} to {hi}{na}."
    )


def render_judge_messages(aspect: str, instruction: str, completions: list[str],
                          reference: str | None = None, *, structured: bool = False,
                          custom_dir: str | None = None) -> list[dict[str, str]]:
    """System + user messages asking the judge to rate ``completions`` on ``aspect``.

    With a non-blank ``reference`` the ``<aspect>_with_answer`` template is used when one
    exists (built-in: helpfulness and truthfulness, as in UltraFeedback); other aspects ignore
    the reference, as upstream does. ``custom_dir`` may hold rubric files and a ``system.jinja``
    that override the built-ins.
    """
    if not completions:
        raise ValueError("completions must not be empty")
    if not all(isinstance(c, str) for c in completions):
        raise TypeError("completions must be strings")
    rubric = _require(aspect, custom_dir)
    has_ref = reference is not None and reference.strip() != ""
    if has_ref:
        rubric = find_rubric(f"{aspect}_with_answer", custom_dir) or rubric
    system = _require("system", custom_dir, system=True)
    variables = {"instruction": instruction, "completions": list(completions),
                 "reference": reference if has_ref else None}
    user = _render(rubric, **variables)
    if structured:
        lo, hi, na = _require(aspect, custom_dir).scale
        user += _structured_suffix(len(completions), lo, hi, na)
    return [
        {"role": "system", "content": _render(system, **variables)},
        {"role": "user", "content": user},
    ]


def check_rubrics(judges: Sequence[JudgeSpec], k: int) -> None:
    """Render every judge's rubrics for ``k`` texts, with a reference answer and without
    (different templates may serve the two, and a template may fail on ``reference=None``),
    so a missing, unsafe or failing template stops the run before generation, not after."""
    for spec in judges:
        for aspect in spec.aspects:
            for reference in ("reference", None):
                render_judge_messages(aspect, "instruction", ["text"] * k, reference,
                                      structured=spec.mode == "structured",
                                      custom_dir=spec.templates_dir)
