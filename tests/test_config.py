from __future__ import annotations

from pathlib import Path

import pytest

from prefsynth.config import ModelSpec, load_config, parse_config
from prefsynth.errors import ConfigError
from tests.conftest import fake_config, write_config


def test_valid_config_has_tulu3_defaults(tmp_path: Path) -> None:
    cfg = parse_config(fake_config(tmp_path))
    assert cfg.models[0].params.temperature == 1.0
    assert cfg.models[0].params.top_p == 1.0
    assert cfg.judge.params.temperature == 0.1
    assert cfg.judge.aspects == ["helpfulness", "honesty", "instruction_following", "truthfulness"]
    assert cfg.responses_per_prompt == 4
    assert cfg.store_path == Path(cfg.output) / ".prefsynth" / "store.sqlite"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(colour="blue"), "colour: unknown key"),
        (lambda c: c["models"][1].update(temprature=0.5), "models.1.temprature: unknown key"),
        (lambda c: c.update(responses_per_prompt=5), "responses_per_prompt: 5 is larger than the pool"),
        (lambda c: c.update(on_policy="zzz"), "on_policy: 'zzz' is not a model in the pool"),
        (lambda c: c.update(responses_per_prompt=1), "at least 2 responses"),
        (lambda c: c["models"].append(dict(c["models"][0])), "duplicate name 'a'"),
        (lambda c: c["prompts"].update(dataset="x"), "exactly one of prompts.path or prompts.dataset"),
        (lambda c: c["judge"].update(mode="telepathy"), "judge.mode"),
        (lambda c: c.update(pairs={"weights": {"style": 2}}), "pairs.weights: 'style'"),
        (lambda c: c.pop("judge"), "judge: Field required"),
        (lambda c: c.update(seed=2**64), "seed: must be an integer from 0 to 2**64 - 1"),
        (lambda c: c.update(seed=-1), "seed: must be an integer from 0 to 2**64 - 1"),
        (lambda c: c["judge"].update(aspects=[]), "judge.aspects: at least one aspect is needed"),
        (lambda c: c["judge"].update(aspects=["honesty", "honesty"]),
         "judge.aspects: 'honesty' is listed twice"),
        (lambda c: c["judge"].update(aspects=["style"]),
         "judge.aspects: 'style' is not a built-in aspect"),
        (lambda c: c["judge"].update(aspects=["../x"], templates_dir="t"),
         "judge.aspects: '../x' is not an aspect name"),
        (lambda c: c.update(panel=[{**c["judge"], "name": "j2", "aspects": ["style"]}],
                            judge={**c["judge"], "aspects": ["style"], "templates_dir": "t"}),
         "panel.0.aspects: 'style' is not a built-in aspect"),
        (lambda c: c["models"][0].update(options={"n_ctx": {"nested": 1}}),
         "models.0.options.n_ctx: must be a string, number, boolean or null, got dict"),
        (lambda c: c["judge"].update(options={"x": [1, 2]}), "judge.options.x: must be a string"),
        (lambda c: c["judge"].update(options={"x": float("inf")}),
         "judge.options.x: must be a finite number"),
        (lambda c: c["judge"].update(params={"temperature": float("nan")}),
         "judge.params.temperature: Input should be a finite number"),
        # the pipeline keys backends by name: one would silently replace the other
        (lambda c: c["judge"].update(name="b"), "judge.name: 'b' is also a pool model's name"),
        (lambda c: c.update(panel=[{**c["judge"], "name": "c"}]),
         "panel.0.name: 'c' is also a pool model's name"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(tmp_path: Path, mutate, message: str) -> None:
    cfg = fake_config(tmp_path)
    mutate(cfg)
    path = write_config(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert message in text
    assert str(path) in text
    assert "\n" not in text


def test_missing_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n  - {name: a\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_options_keep_scalars(tmp_path: Path) -> None:
    opts = {"n_ctx": 4096, "flash": True, "rope": 0.5, "path": "m.gguf", "none": None}
    # the ModelSpec type alone: which names a backend accepts is its Options model's business
    spec = ModelSpec.model_validate({"name": "j", "backend": "fake", "model": "m",
                                     "options": opts})
    assert spec.options == opts
    assert type(spec.options["flash"]) is bool and type(spec.options["n_ctx"]) is int


def test_output_and_store_paths_that_cannot_be_made(tmp_path: Path) -> None:
    """``--output`` at a file raised NotADirectoryError from the store once the run started."""
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    path = write_config(tmp_path, fake_config(tmp_path))
    for over, message in [
        ({"output": str(afile)}, f"output: {afile} is a file, not a folder"),
        ({"output": str(afile / "sub" / "out")}, f"output: {afile} is a file, not a folder"),
        ({"store": str(tmp_path)}, f"store: {tmp_path} is a folder, not a file"),
        ({"store": str(afile / "s.sqlite")}, f"store: {afile} is a file, not a folder"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(path, over)
        assert f"{path}: {message}" == str(e.value)
    assert load_config(path, {"output": str(tmp_path / "new" / "out")}).output.endswith("out")


LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # "billion laughs": 600 bytes that expand to gigabytes once dumped into run.json
        (LAUGHS, r"line 2 invalid YAML: aliases \(\*a\) are not supported"),
        ("models: &m [{name: a}]\npanel: *m\n", r"line 2 invalid YAML: aliases \(\*m\)"),
        ("x: " + "[" * 200_000 + "]" * 200_000 + "\n", r"line 1 invalid YAML: nested more than"),
        ("seed: " + "9" * 5000 + "\n", r"line 1 invalid YAML: integer too long"),
        ('name: "\\ud800"\n', r"line 1 invalid YAML: a lone surrogate"),
        ('"\\udfff": 1\n', r"line 1 invalid YAML: a lone surrogate"),
        ("seed: 1\nname: x\nseed: 2\n", r"line 3 invalid YAML: duplicate key 'seed'"),
        (b"\xff\xfe".decode("latin-1"), r"not valid UTF-8"),
    ],
)
def test_hostile_yaml_is_one_line_with_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("latin-1") if message == "not valid UTF-8" else
                     text.encode("utf-8"))
    with pytest.raises(ConfigError, match=rf"c.yaml:? {message}") as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_yaml_anchors_alone_and_bom_are_fine(tmp_path: Path) -> None:
    import yaml

    text = yaml.safe_dump(fake_config(tmp_path)).replace("name: fake-run", "name: &n fake-run")
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_config(path).name == "fake-run"


def test_override_into_a_scalar_is_a_config_error(tmp_path: Path) -> None:
    cfg = fake_config(tmp_path)
    cfg["prompts"] = "prompts.jsonl"
    path = write_config(tmp_path, cfg)
    with pytest.raises(ConfigError, match=r"config.yaml: prompts: expected a mapping of settings, "
                                          r"got str"):
        load_config(path, {"prompts.path": "x.jsonl"})


def test_on_policy_pool(tmp_path: Path) -> None:
    cfg = parse_config(fake_config(tmp_path, on_policy="a", responses_per_prompt=2))
    assert cfg.on_policy == "a"


def test_overrides(tmp_path: Path) -> None:
    path = write_config(tmp_path, fake_config(tmp_path))
    cfg = load_config(path, {"output": str(tmp_path / "elsewhere"), "judge.max_reasks": 0})
    assert cfg.output.endswith("elsewhere")
    assert cfg.judge.max_reasks == 0


def test_example_configs_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    for path in sorted(root.glob("*.yaml")):
        load_config(path)  # raises on any unknown key or inconsistency
