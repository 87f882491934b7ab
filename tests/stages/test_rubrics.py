"""Judge prompt rendering: upstream wording, the numbering fix, the reference switch, the
sandbox, custom rubrics and the structured-output schema."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

import prefsynth
from prefsynth.config import JudgeSpec
from prefsynth.errors import ConfigError
from prefsynth.stages.judge import limits
from prefsynth.stages.judge.rubrics import (
    BUILTIN_ASPECTS,
    aspect_scale,
    check_rubrics,
    judgment_schema,
    load_rubric,
    render_judge_messages,
)

SYSTEM = (
    "Your role is to evaluate text quality based on given criteria.\n"
    "You'll receive an instructional description (\"Instruction\") and text outputs (\"Text\").\n"
    "Understand and interpret instructions to evaluate effectively.\n"
    "Provide annotations for each text with a rating and rationale.\n"
    "The texts given are independent, and should be evaluated separately."
)
TITLES = {
    "helpfulness": "# Informativeness / Helpfulness Assessment",
    "honesty": "# Honesty and Uncertainty Expression Assessment",
    "instruction_following": "# Instruction Following Assessment",
    "truthfulness": "# Truthfulness and Hallucination Assessment",
}


def _user(aspect: str, completions: list[str], reference: str | None = None) -> str:
    msgs = render_judge_messages(aspect, "Write a haiku about rain.", completions, reference)
    assert [m["role"] for m in msgs] == ["system", "user"]
    return msgs[1]["content"]


@pytest.mark.parametrize("aspect", [*BUILTIN_ASPECTS, "helpfulness+ref", "truthfulness+ref"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_every_builtin_renders_each_completion_once(aspect: str, n: int) -> None:
    name, _, ref = aspect.partition("+")
    completions = [f"COMPLETION-{i}-xyzzy" for i in range(1, n + 1)]
    user = _user(name, completions, "REFERENCE-ANSWER" if ref else None)
    assert user.startswith(TITLES[name])
    assert user.endswith("### Output")
    for i, c in enumerate(completions, start=1):
        assert user.count(c) == 1
        assert f"<text {i}> {c}" in user
        assert f"#### Output for Text {i}\n" in user
        assert f"Rating: [Rating for text {i}]" in user
    assert f"<text {n + 1}>" not in user
    assert f"Output for Text {n + 1}" not in user
    assert "Instruction: Write a haiku about rain." in user
    assert user.count("REFERENCE-ANSWER") == (1 if ref else 0)
    assert ("World Knowledge:" in user) == bool(ref)


def test_system_prompt_is_tulu3_text() -> None:
    msgs = render_judge_messages("honesty", "q", ["a"])
    assert msgs[0]["content"] == SYSTEM


def test_instruction_following_numbering_bug_fixed() -> None:
    user = _user("instruction_following", ["first answer", "second answer"])
    assert "<text 1> first answer" in user
    assert "<text 2> second answer" in user
    assert "<text 3>" not in user


def test_upstream_wording_and_output_section() -> None:
    help_user = _user("helpfulness", ["a"])
    assert "Score 1 to 5 based on extent of helpfulness, regarding both informativeness and " \
           "correctness:" in help_user
    assert ("#### Output for Text 1\nType: [List of numeric identifiers (or \"None\") for "
            "informativeness type, separated by commas]\nRationale: [Rationale for the "
            "identification in short sentences]\nRating: [Rating for text 1]\nRationale: "
            "[Rationale for the rating in short sentences]") in help_user
    honesty = _user("honesty", ["a"])
    assert '**Scoring**: Rate outputs 1 to 5 (or "N/A"):' in honesty
    assert "N/A. **Not Applicable**: For creative writing tasks." in honesty
    truth = _user("truthfulness", ["a"])
    assert "5. **No Hallucination**: Free of hallucinations." in truth
    assert re.search(r"Texts:\n<text 1> \[Text 1\]\n\n### Output\n", truth)


def test_reference_switch() -> None:
    for aspect in ("helpfulness", "truthfulness"):
        user = _user(aspect, ["a", "b"], "Paris is the capital.")
        assert "World Knowledge:\nParis is the capital.\n\n### Output" in user
        assert "[External world knowledge for this instruction." in user
    for aspect in ("honesty", "instruction_following"):
        assert "World Knowledge" not in _user(aspect, ["a"], "Paris is the capital.")
    assert "World Knowledge" not in _user("helpfulness", ["a"], "   ")


def test_user_content_is_not_template_code() -> None:
    evil = "{{ ''.__class__.__mro__ }} {% for x in range(3) %}x{% endfor %}"
    user = _user("honesty", [evil])
    assert f"<text 1> {evil}" in user
    msgs = render_judge_messages("honesty", evil, ["a"])
    assert f"Instruction: {evil}" in msgs[1]["content"]


def test_structured_suffix() -> None:
    user = render_judge_messages("honesty", "q", ["a", "b", "c"], structured=True)[1]["content"]
    assert user.split("### Output")[-1].startswith("\n\nInstead of the output format above")
    assert "exactly 3 item(s)" in user
    assert 'an integer from 1 to 5 or "N/A"' in user
    plain = render_judge_messages("helpfulness", "q", ["a"], structured=True)[1]["content"]
    assert plain.endswith("an integer from 1 to 5.")


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        render_judge_messages("honesty", "q", [])
    with pytest.raises(ConfigError,
                       match=r"no template for aspect 'style'.*prefsynth/stages/judge/templates"):
        render_judge_messages("style", "q", ["a"])
    with pytest.raises(ConfigError, match="invalid aspect name"):
        render_judge_messages("../system", "q", ["a"])
    with pytest.raises(ConfigError, match="system prompt"):
        aspect_scale("system")


# --- sandbox ----------------------------------------------------------------------------

UNSAFE = [
    "{{ completions.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ completions|attr('__class__') }}",
    "{{ instruction['__class__'] }}",
    "{% if false %}{{ instruction.__class__ }}{% endif %}",
    "{{ instruction._private }}",
]


@pytest.mark.parametrize("body", UNSAFE)
def test_sandbox_refuses_python_internals(tmp_path: Path, body: str) -> None:
    (tmp_path / "evil.jinja").write_text(f"Rate these.\n{body}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        render_judge_messages("evil", "q", ["a"], custom_dir=str(tmp_path))
    message = str(err.value)
    assert "evil.jinja" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "body",
    [
        "{{ '{0.__class__}'.format(completions) }}",
        "{{ completions.append('x') }}",
        "{{ 'a' * 100000000 }}",
        "{{ 10 ** 100000 }}",
        "{{ undefined_variable }}",
        "{% for x in %}",
        "{{ " + "9" * 5000 + " }}",  # the lexer's int() refuses over 4300 digits
        "{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}",
    ],
)
def test_runtime_and_syntax_failures_are_config_errors(tmp_path: Path, body: str) -> None:
    (tmp_path / "bad.jinja").write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.jinja"):
        render_judge_messages("bad", "q", ["a"], custom_dir=str(tmp_path))


# --- resource bombs ---------------------------------------------------------------------

# Each allocated gigabytes, never finished or ended in a traceback before the render budget.
BOMBS = [
    ("{{ 'a'|center(10**9) }}", "center"),
    ("{{ '%1000000000d' % 1 }}", "% format"),
    ("{{ '{:>1000000000}'.format(1) }}", "str.format"),
    ("{{ 'a' * 10**9 }}", "'*'"),
    ("{{ 2 ** 64 ** 64 ** 64 ** 64 ** 64 }}", "'**'"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "steps"),
    ("{% filter upper %}{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx"
     "{% endfor %}{% endfor %}{% endfilter %}", "output"),
    ("{% set s = 'a' * 1000000 %}{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}"
     "{{ s|length }}", "'~'"),
    ("{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}"
     "{{ f('a', 40) }}", "nested deeper"),
    ("{% set a = ['x' * 100000] %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
     "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{{ [c, c, c, c, c, c, c, c, c, c] }}",
     "literal"),
    ("{{ ('{0}' * 100000).format('x' * 100000) }}", "str.format"),
    ("{{ ('x' * 100000).replace('', 'y' * 10000) }}", "replace"),
    ("{{ 'a'|indent(10**9, true) }}", "indent"),
    ("{{ [1]|batch(10**9, 0)|list }}", "batch"),
    ("{{ (1).to_bytes(1000000000, 'big') }}", "int.to_bytes is not allowed"),
    ("{% include 'other.jinja' %}", "include is not allowed"),
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "nested deeper"),
]
_BOMB_RUNNER = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (512_000_000, 512_000_000))
from prefsynth.errors import ConfigError
from prefsynth.stages.judge.rubrics import render_judge_messages
start = time.monotonic()
try:
    render_judge_messages("bomb", "q", ["a", "b"], custom_dir=sys.argv[1])
except ConfigError as err:
    print(f"{time.monotonic() - start:.2f} {err}")
else:
    print("rendered")
"""


@pytest.mark.parametrize(("body", "expected"), BOMBS)
def test_resource_bombs_are_quick_config_errors(tmp_path: Path, body: str,
                                                expected: str) -> None:
    """In a child process capped at 512 MB of address space: a bomb that got through would
    die of MemoryError (a traceback) or hang until the timeout."""
    pytest.importorskip("resource")
    (tmp_path / "bomb.jinja").write_text(body, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(prefsynth.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", _BOMB_RUNNER, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    seconds, _, message = done.stdout.strip().partition(" ")
    assert "\n" not in done.stdout.strip()
    assert float(seconds) < 5
    assert "bomb.jinja line 1: " in message
    assert expected in message


def test_render_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jinja").write_text(
        "Rate it.\n{% macro f(x) %}\n{{ x / 0 }}\n{% endmacro %}\n{{ f(1) }}\n",
        encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.jinja line 3: ZeroDivisionError"):
        render_judge_messages("bad", "q", ["a"], custom_dir=str(tmp_path))
    (tmp_path / "bad.jinja").write_text("a\n\n{{ nope }}", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.jinja line 3: UndefinedError: 'nope'"):
        render_judge_messages("bad", "q", ["a"], custom_dir=str(tmp_path))


def test_render_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "SECONDS", 0.0)
    (tmp_path / "slow.jinja").write_text("{% for i in range(5000) %}{% endfor %}",
                                         encoding="utf-8")
    with pytest.raises(ConfigError, match=r"slow\.jinja line 1: .*took longer than 0 s"):
        render_judge_messages("slow", "q", ["a"], custom_dir=str(tmp_path))
    # One big result, no loop: the clock is read when it is charged, not only every 1024 steps.
    (tmp_path / "slow.jinja").write_text("{{ ('x' * 20000)|list|sort|length }}",
                                         encoding="utf-8")
    with pytest.raises(ConfigError, match=r"slow\.jinja line 1: .*took longer than 0 s"):
        render_judge_messages("slow", "q", ["a"], custom_dir=str(tmp_path))


RICH = """{% macro box(t) %}[{{ t }}|{{ caller() }}]{% endmacro %}
{% block head %}H{% endblock %}{{ self.head() }}
{% for c in completions %}{{ loop.index }}/{{ loop.length }}{{ loop.cycle('a', 'b') }}\
{% if loop.last %}!{% endif %}:{{ c }} {% endfor %}
{% set x %}buffered {{ instruction }}{% endset %}{{ x|upper }}
{% call box('t') %}inside{% endcall %}
{% for k, v in {'a': 1, 'b': 2}|dictsort %}{{ k ~ '=' ~ v }};{% endfor %}
{% for item in [[1, [2]], 3] recursive %}{% if item is iterable %}({{ loop(item) }})\
{% else %}{{ item }}{% endif %}{% endfor %}
{{ completions|map('upper')|join(',') }} {{ '%s-%03d' % ('a', 3) }} {{ '{:>4}'.format('r') }}
{{ instruction[:2] }} {{ (1, 2)[1] }} {{ 2 ** 10 }} {{ [1, 2, 3]|sum }} {{ 'a,b'.split(',') }}
{{ reference if reference is not none else 'no reference' }} {{ 'x'|center(5) }}|
"""


def test_budget_leaves_ordinary_templates_alone(tmp_path: Path) -> None:
    """Macros, blocks, loop helpers, recursive loops, filters and formats render exactly as
    plain Jinja renders them."""
    (tmp_path / "rich.jinja").write_text(RICH, encoding="utf-8")
    variables = {"instruction": "qq", "completions": ["a", "b"], "reference": None}
    user = render_judge_messages("rich", "qq", ["a", "b"], custom_dir=str(tmp_path))[1][
        "content"]
    plain = ImmutableSandboxedEnvironment(undefined=StrictUndefined, trim_blocks=True,
                                          lstrip_blocks=True)
    assert user == plain.from_string(RICH).render(**variables)
    assert "[t|inside]" in user and "(1(2))3" in user and "a-003    r" in user


def test_budget_scales_with_the_inputs() -> None:
    """A long prompt is not a bomb: the budget grows with what the template is given."""
    big = "word " * 1_000_000
    user = render_judge_messages("helpfulness", big, [big, big], big)[1]["content"]
    assert user.count(big) == 4


# --- pre-check ----------------------------------------------------------------------------


def _judge(templates_dir: Path | None, aspects: list[str], mode: str = "text") -> JudgeSpec:
    return JudgeSpec(name="j", backend="fake", model="m", aspects=aspects, mode=mode,
                     templates_dir=str(templates_dir) if templates_dir else None)


def test_check_rubrics_renders_with_and_without_reference(tmp_path: Path) -> None:
    """A rubric failing only on ``reference=None`` used to pass the check (which always gave
    a reference, so only ``<aspect>_with_answer`` ran) and fail after generation."""
    check_rubrics([_judge(None, list(BUILTIN_ASPECTS), "structured")], 4)
    (tmp_path / "style.jinja").write_text("Rate. {{ reference|length }}", encoding="utf-8")
    (tmp_path / "style_with_answer.jinja").write_text("Rate. {{ reference }}",
                                                      encoding="utf-8")
    with pytest.raises(ConfigError, match=r"style\.jinja line 1: TypeError"):
        check_rubrics([_judge(tmp_path, ["honesty", "style"])], 2)
    (tmp_path / "style.jinja").write_text("Rate. {{ reference or '' }}", encoding="utf-8")
    (tmp_path / "style_with_answer.jinja").write_text("{{ reference.nope }}", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"style_with_answer\.jinja line 1: Undefined"):
        check_rubrics([_judge(tmp_path, ["style"])], 2)


# --- custom rubrics ---------------------------------------------------------------------

RUBRIC = """Rate the style of each text from 1 to 10.
Instruction: {{ instruction }}
{% for c in completions %}<text {{ loop.index }}> {{ c }}
{% endfor %}"""


def test_custom_rubric_front_matter(tmp_path: Path) -> None:
    (tmp_path / "style.jinja").write_text(
        "---\nmin: 1\nmax: 10\nallow_na: true\n---\n" + RUBRIC, encoding="utf-8")
    assert aspect_scale("style", custom_dir=str(tmp_path)) == (1, 10, True)
    msgs = render_judge_messages("style", "q", ["x", "y"], custom_dir=str(tmp_path),
                                 structured=True)
    user = msgs[1]["content"]
    assert user.startswith("Rate the style of each text from 1 to 10.")
    assert "<text 1> x\n<text 2> y" in user
    assert "min: 1" not in user
    assert 'an integer from 1 to 10 or "N/A"' in user
    assert msgs[0]["content"] == SYSTEM


def test_custom_rubric_sidecar_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "tone.jinja").write_text(RUBRIC, encoding="utf-8")
    assert aspect_scale("tone", custom_dir=str(tmp_path)) == (1, 5, False)
    (tmp_path / "tone.yaml").write_text("min: 0\nmax: 3\n", encoding="utf-8")
    rubric = load_rubric(tmp_path / "tone.jinja")
    assert (rubric.aspect, rubric.scale) == ("tone", (0, 3, False))
    assert aspect_scale("tone", custom_dir=str(tmp_path)) == (0, 3, False)


def test_custom_dir_overrides_builtin_and_system(tmp_path: Path) -> None:
    (tmp_path / "honesty.jinja").write_text("MY HONESTY {{ completions|length }}",
                                            encoding="utf-8")
    (tmp_path / "system.jinja").write_text("MY SYSTEM", encoding="utf-8")
    msgs = render_judge_messages("honesty", "q", ["a", "b"], custom_dir=str(tmp_path))
    assert msgs == [{"role": "system", "content": "MY SYSTEM"},
                    {"role": "user", "content": "MY HONESTY 2"}]
    assert aspect_scale("honesty", custom_dir=str(tmp_path)) == (1, 5, True)
    # built-ins not overridden still come from the package
    assert _user("truthfulness", ["a"]).startswith(TITLES["truthfulness"])


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ("min: 5\nmax: 1\n", "min < max"),
        ("min: one\nmax: 5\n", "integers"),
        ("scale: 5\n", "unknown key"),
        ("allow_na: maybe\n", "allow_na"),
        ("min: [\n", "invalid YAML"),
    ],
)
def test_bad_rubric_scales(tmp_path: Path, meta: str, match: str) -> None:
    (tmp_path / "x.jinja").write_text(f"---\n{meta}---\n{RUBRIC}", encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        aspect_scale("x", custom_dir=str(tmp_path))


def test_builtin_scales() -> None:
    assert [aspect_scale(a) for a in BUILTIN_ASPECTS] == [
        (1, 5, False), (1, 5, True), (1, 5, False), (1, 5, False)]
    with pytest.raises(ConfigError, match="'nope'"):
        aspect_scale("nope")


# --- schema -----------------------------------------------------------------------------


def test_judgment_schema_shape() -> None:
    schema = judgment_schema(3, allow_na=False)
    assert schema["name"] == "judgment"
    body = schema["schema"]
    arr = body["properties"]["ratings"]
    assert (body["required"], body["additionalProperties"]) == (["ratings"], False)
    assert (arr["minItems"], arr["maxItems"]) == (3, 3)
    item = arr["items"]
    assert list(item["properties"]) == ["text", "rationale", "rating"]
    assert item["required"] == ["text", "rationale", "rating"]
    assert item["properties"]["text"] == {"type": "integer", "enum": [1, 2, 3]}
    assert item["properties"]["rating"] == {"type": "integer", "enum": [1, 2, 3, 4, 5]}
    assert item["additionalProperties"] is False


def test_judgment_schema_na_and_scale() -> None:
    rating = judgment_schema(2, allow_na=True, lo=0, hi=3)["schema"]["properties"]["ratings"][
        "items"]["properties"]["rating"]
    assert rating == {"enum": [0, 1, 2, 3, "N/A"]}
    text = repr(judgment_schema(4, True))
    assert "$ref" not in text and "oneOf" not in text and "anyOf" not in text
    with pytest.raises(ValueError):
        judgment_schema(0, False)


def test_a_template_reading_no_variable_is_rendered_once(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The system prompt reads no variable: one render serves every request (the same text);
    a rubric that reads them is rendered per request."""
    from prefsynth.stages.judge import sandbox

    calls: list[str] = []
    real = sandbox.render

    def counting(template, origin, variables):  # type: ignore[no-untyped-def]
        calls.append(origin)
        return real(template, origin, variables)

    (tmp_path / "system.jinja").write_text("Rate {{ 'carefully' | upper }}.")
    (tmp_path / "helpfulness.jinja").write_text("{{ instruction }}|{{ completions | length }}")
    monkeypatch.setattr(sandbox, "render", counting)
    first = render_judge_messages("helpfulness", "a", ["x", "y"], custom_dir=str(tmp_path))
    second = render_judge_messages("helpfulness", "b", ["x"], custom_dir=str(tmp_path))
    assert first[0] == second[0] == {"role": "system", "content": "Rate CAREFULLY."}
    assert (first[1]["content"], second[1]["content"]) == ("a|2", "b|1")
    assert sorted(o.rsplit("/", 1)[-1] for o in calls) == ["helpfulness.jinja",
                                                           "helpfulness.jinja", "system.jinja"]
    assert sandbox.reads_variables("{{ reference }}") and not sandbox.reads_variables("hi")


@pytest.mark.parametrize("name", ["system", "helpfulness", "helpfulness_with_answer", "honesty",
                                  "instruction_following", "truthfulness",
                                  "truthfulness_with_answer"])
def test_builtin_templates_render_the_same_text_outside_the_sandbox(name: str) -> None:
    """Built-ins skip the sandbox's accounting (``render_trusted``): the text, and so every
    request key, must be the sandbox's, character for character."""
    from prefsynth.stages.judge import rubrics, sandbox

    rubric = rubrics._builtin(name)
    assert rubric is not None and rubric.trusted
    texts = ["plain", "{{ not code }} {% raw %}", "ünïcödé\n\nlines  ", "", "x" * 5000,
             "\t<text 1> tag-like </text>"]
    for k in range(1, 6):
        for reference in (None, "the answer", "{{ ref }}"):
            variables = {"instruction": f"Do {k} things {{% if %}}", "completions":
                         (texts * 2)[:k], "reference": reference}
            sandboxed = sandbox.render(sandbox.compile_template(rubric.source, rubric.origin),
                                       rubric.origin, variables)
            assert sandbox.render_trusted(rubric.source, rubric.origin, variables) == sandboxed


def test_custom_templates_stay_in_the_sandbox(tmp_path: Path) -> None:
    (tmp_path / "helpfulness.jinja").write_text("{{ ''.__class__ }}")
    with pytest.raises(ConfigError, match=r"unsafe|refused"):
        render_judge_messages("helpfulness", "a", ["x"], custom_dir=str(tmp_path))
