from __future__ import annotations

from pathlib import Path

import pytest

from prefsynth.config import load_config, parse_config
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
