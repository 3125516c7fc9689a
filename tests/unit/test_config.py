"""service/config.py: FRONTIER_* environment, YAML file, precedence init > env > YAML > defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from service.config import REPO_MANIFESTS, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No FRONTIER_* variable from the caller's shell (the Makefile exports HOST/PORT) leaks in."""
    for key in list(os.environ):
        if key.upper().startswith("FRONTIER_"):
            monkeypatch.delenv(key)


@pytest.fixture
def yaml_file(tmp_path, monkeypatch):
    def write(data) -> Path:
        path = tmp_path / "frontier.yaml"
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        monkeypatch.setenv("FRONTIER_CONFIG_FILE", str(path))
        return path

    return write


def test_defaults():
    s = Settings()
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.models == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    assert s.manifests_dir == REPO_MANIFESTS and s.config_file is None
    assert s.models_dir == Path.home() / ".cache" / "frontier" / "models"
    assert s.api_key is None and s.max_model_len is None and s.engine == "auto"


def test_env_vars(monkeypatch, tmp_path):
    monkeypatch.setenv("FRONTIER_PORT", "9001")
    monkeypatch.setenv("FRONTIER_HOST", "0.0.0.0")
    monkeypatch.setenv("FRONTIER_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("FRONTIER_API_KEY", "sekrit")
    monkeypatch.setenv("FRONTIER_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("frontier_device", "cpu")  # case-insensitive, like pydantic-settings' default
    s = Settings()
    assert (s.port, s.host, s.max_model_len, s.api_key) == (9001, "0.0.0.0", 1024, "sekrit")
    assert s.models_dir == tmp_path and s.device == "cpu"


def test_models_from_env_as_json_list(monkeypatch):
    monkeypatch.setenv("FRONTIER_MODELS", '["a", "b", "c"]')
    assert Settings().models == ["a", "b", "c"]
    monkeypatch.setenv("FRONTIER_MODELS", "[]")
    assert Settings().models == []


def test_invalid_env_value_is_rejected(monkeypatch):
    monkeypatch.setenv("FRONTIER_PORT", "not-a-port")
    with pytest.raises(ValueError):
        Settings()


def test_unprefixed_env_is_ignored(monkeypatch):
    monkeypatch.setenv("PORT", "1234")
    assert Settings().port == 8000


def test_yaml_file(yaml_file):
    path = yaml_file({"port": 7000, "models": ["x"], "log_level": "debug", "unknown_key": 1})
    s = Settings()
    assert (s.port, s.models, s.log_level) == (7000, ["x"], "debug")
    assert s.config_file == path  # the env var also fills the field itself
    assert s.host == "127.0.0.1"  # not in the file: default


def test_empty_yaml_file_means_defaults(yaml_file):
    yaml_file("")
    assert Settings().port == 8000


def test_yaml_must_be_a_mapping(yaml_file):
    yaml_file("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        Settings()


def test_precedence_init_over_env_over_yaml_over_defaults(yaml_file, monkeypatch):
    yaml_file({"port": 7000, "host": "yaml-host", "log_level": "warning", "models": ["from-yaml"]})
    monkeypatch.setenv("FRONTIER_PORT", "9001")
    monkeypatch.setenv("FRONTIER_HOST", "env-host")
    s = Settings(port=1234)
    assert s.port == 1234  # init > env > yaml
    assert s.host == "env-host"  # env > yaml
    assert s.log_level == "warning" and s.models == ["from-yaml"]  # yaml > defaults
    assert s.max_waiting_requests == 256  # default
    monkeypatch.setenv("FRONTIER_MODELS", '["from-env"]')
    assert Settings().models == ["from-env"]
    assert Settings(models=["from-init"]).models == ["from-init"]


def test_engine_settings_defaults_and_env(monkeypatch):
    from service.engine.config import DEFAULT_KV_CACHE_BYTES, EngineConfig, Quantization

    s = Settings()
    assert s.kv_cache_memory_bytes == DEFAULT_KV_CACHE_BYTES == EngineConfig().kv_cache_bytes  # one default
    assert (s.kv_block_size, s.max_num_seqs, s.max_num_batched_tokens, s.enable_prefix_caching) == (16, 64, 256, True)
    assert s.quantization is None
    for key, value in {"KV_BLOCK_SIZE": "8", "MAX_NUM_SEQS": "4", "MAX_NUM_BATCHED_TOKENS": "64",
                       "ENABLE_PREFIX_CACHING": "false", "QUANTIZATION": "int8"}.items():
        monkeypatch.setenv(f"FRONTIER_{key}", value)
    s = Settings()
    assert (s.kv_block_size, s.max_num_seqs, s.max_num_batched_tokens, s.enable_prefix_caching) == (8, 4, 64, False)
    assert s.quantization is Quantization.INT8
    monkeypatch.setenv("FRONTIER_QUANTIZATION", "int3")
    with pytest.raises(ValueError):
        Settings()
    monkeypatch.setenv("FRONTIER_QUANTIZATION", "none")
    monkeypatch.setenv("FRONTIER_MAX_NUM_SEQS", "0")
    with pytest.raises(ValueError):
        Settings()
