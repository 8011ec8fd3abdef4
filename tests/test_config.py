import dataclasses
from pathlib import Path

import pytest
import yaml

from edge_emollama.config import Config, load_config
from edge_emollama.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("runtime:\n  windows:\n    hop_seconds: 0.5\n")
    with pytest.raises(ConfigError, match=r"runtime\.windows\.hop_seconds.*did you mean 'hop_s'"):
        load_config(path)


def test_wrong_type_and_bad_choice_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("runtime:\n  windows:\n    window_s: long\n")
    with pytest.raises(ConfigError, match="runtime.windows.window_s.*must be float"):
        load_config(path)
    path.write_text("model:\n  layout: inferense\n")
    with pytest.raises(ConfigError, match="did you mean 'inference'"):
        load_config(path)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def _keys(node, prefix=""):
    if dataclasses.is_dataclass(node):
        node = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    if not isinstance(node, dict) or not node or prefix.endswith("links"):
        return {prefix}
    return set().union(*(_keys(v, f"{prefix}.{k}" if prefix else k) for k, v in node.items()))


def test_repository_config_yaml_documents_exactly_the_defaults():
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert load_config(ROOT / "config.yaml") == Config()
    assert _keys(data) == _keys(Config())     # every key written out, none more


def test_a_bad_value_is_refused_when_the_config_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("runtime:\n  fusion:\n    method: kalman\n")
    with pytest.raises(ConfigError, match="runtime.fusion.method = 'kalman'"):
        load_config(path)
    with pytest.raises(ConfigError, match="runtime.links"):
        load_config(overrides={"runtime.links": {"rowz": "tcp://127.0.0.1:1"}})
