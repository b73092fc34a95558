"""Run configuration: precedence, TOML keys, validation messages and the generated reference."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from pathlib import Path

import pytest

from server.config import (
    ConfigError,
    RunConfig,
    add_run_arguments,
    config_reference_markdown,
    resolve_run_config,
)
from server.live.modes import Mode
from server.model.files import DEFAULT_MODELS_DIR


def resolve(*argv: str) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return resolve_run_config(parser.parse_args(list(argv)))


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "antiphon.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = resolve()
    assert config == RunConfig()
    assert config.model == "default" and config.mode is Mode.ACCOMPANY
    assert (config.host, config.port, config.send) == ("127.0.0.1", 5710, (("127.0.0.1", 5711),))
    assert (config.temperature, config.timescale, config.threshold) == (1.0, 1.0, 1.5)
    assert config.sigma_temperature is None  # the model's own (model.json's calibrated one, else 1)
    # your models and logs: the per-user folder (tests put it under a temporary XDG_DATA_HOME, see conftest)
    user = Path(os.environ["XDG_DATA_HOME"]) / "antiphon"
    assert (config.models_dir, config.log_dir) == (user / "models", user / "logs")
    # the shipped models: the checkout's own models/ (a wheel's are package data, see test_wheel.py)
    assert DEFAULT_MODELS_DIR == Path(__file__).resolve().parent.parent / "models"
    assert (config.seed, config.allow) == (None, ())


def test_flags_are_none_unless_given() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    assert all(value is None for value in vars(parser.parse_args([])).values())


def test_precedence_defaults_then_toml_then_flags(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'temperature = 0.5\nport = 6000\nmode = "respond"\nsigma-temperature = 0\n')
    config = resolve("--config", str(path), "--temperature", "0.7", "--threshold", "3")
    assert config.temperature == 0.7  # flag beats file
    assert config.port == 6000 and config.mode is Mode.RESPOND and config.sigma_temperature == 0.0  # file
    assert config.threshold == 3.0 and config.timescale == 1.0  # flag, default


def test_repeatable_keys_from_file_and_flags(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'send = ["10.0.0.2:9000", "[::1]:9001"]\nallow = "192.168.1.7/24"\n')
    config = resolve("--config", str(path))
    assert config.send == (("10.0.0.2", 9000), ("::1", 9001))
    assert config.allow == (ipaddress.ip_network("192.168.1.0/24"),)
    config = resolve("--config", str(path), "--send", "localhost:1", "--send", "h:2", "--allow", "127.0.0.1")
    assert config.send == (("localhost", 1), ("h", 2))  # flags replace, not extend
    assert config.allow == (ipaddress.ip_network("127.0.0.1/32"),)
    assert resolve("--config", str(write_toml(tmp_path, "send = []\n"))).send == ()


def test_relative_paths_in_a_file_are_relative_to_it(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'log_dir = "perf"\nmodels-dir = "/abs/models"\n')
    config = resolve("--config", str(path))
    assert config.log_dir == tmp_path / "perf" and config.models_dir == Path("/abs/models")
    assert resolve("--config", str(path), "--log-dir", "here").log_dir == Path("here")


def test_unknown_key_names_it_and_lists_the_valid_ones(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "temprature = 0.5\n")
    with pytest.raises(ConfigError, match="unknown key 'temprature'") as caught:
        resolve("--config", str(path))
    assert "temperature" in str(caught.value) and "sigma_temperature" in str(caught.value)


def test_config_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        resolve("--config", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="invalid TOML"):
        resolve("--config", str(write_toml(tmp_path, "temperature = \n")))
    with pytest.raises(ConfigError, match="repeats"):
        resolve("--config", str(write_toml(tmp_path, "log_dir = 'a'\nlog-dir = 'b'\n")))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--temperature", "-1"], "--temperature: must be >= 0"),
        (["--temperature", "hot"], "--temperature: expected a number"),
        (["--sigma-temperature", "nan"], "finite"),
        (["--timescale", "0"], "--timescale: must be > 0"),
        (["--threshold", "-0.5"], "--threshold: must be >= 0"),
        (["--port", "70000"], "--port: port must be 0-65535"),
        (["--port", "12.5"], "--port: expected an integer"),
        (["--send", "nohost"], "--send: expected HOST:PORT"),
        (["--send", "host:0"], "port must be 1-65535"),
        (["--send", ":5711"], "expected a host"),
        (["--send", "::1:5711"], "[ADDRESS]:PORT"),
        (["--send", "[::1]5711"], "[IPv6]:PORT"),
        (["--allow", "10.0.0.0/33"], "--allow: expected an address or CIDR"),
        (["--allow", "everyone"], "CIDR"),
        (["--mode", "loud"], "--mode: unknown mode 'loud'"),
        (["--model", ""], "--model: expected a model name or folder path"),
        (["--seed", "-1"], "--seed: must be >= 0"),
        (["--host", "bad host"], "--host: expected a host"),
    ],
)
def test_invalid_flags(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(*argv)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("temperature = true", "temperature: expected a number"),
        ("port = 5710.0", "port: expected an integer"),
        ("seed = '7x'", "seed: expected an integer"),
        ("send = 5711", "send: expected a list"),
        ("send = [5711]", "send: expected HOST:PORT"),
        ("mode = 1", "mode: expected one of respond, accompany, generate, listen"),
        ("model = 3", "model: expected a model name or folder path"),
    ],
)
def test_invalid_file_values_name_file_and_key(tmp_path: Path, toml: str, message: str) -> None:
    path = write_toml(tmp_path, toml + "\n")
    with pytest.raises(ConfigError) as caught:
        resolve("--config", str(path))
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_too_many_destinations() -> None:
    argv = [arg for port in range(1, 34) for arg in ("--send", f"127.0.0.1:{port}")]
    with pytest.raises(ConfigError, match="at most 32"):
        resolve(*argv)


def test_reference_documents_every_key_once() -> None:
    markdown = config_reference_markdown()
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        assert sum(line.startswith(f"| `{f.name}` | `{flag} ") for line in markdown.splitlines()) == 1
    assert "/work" not in markdown  # no machine-specific defaults in the README


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("allow = [true]", "allow: expected an address or CIDR"),  # ip_network(True) is 0.0.0.1/32: all traffic denied
        ("allow = [167772160]", "allow: expected an address or CIDR"),
        ('log_dir = "logs\\u0000x"', "log_dir: expected a path"),
        ('host = "127.0.0.1\\u0000"', "host: expected a host"),
        ('voices = "many"', "voices: unknown voices setting 'many'; expected one of one, per-sender"),
        ("voices = 2", "voices: expected one of one, per-sender"),
        ("lookahead = 5", "lookahead: must be at most 2 seconds"),
        ("lookahead = -0.1", "lookahead: must be >= 0"),
        ("max_voices = 0", "max_voices:"),
        ("voice_timeout = 0", "voice_timeout:"),
    ],
)
def test_values_that_would_fail_later_are_refused_now(tmp_path: Path, toml: str, message: str) -> None:
    path = write_toml(tmp_path, toml + "\n")
    with pytest.raises(ConfigError) as caught:
        resolve("--config", str(path))
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("port = 1\nlog_dir = 'caf\xe9'\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 23)"),
        (b"\x00\x01\x02\xff" * 64, "not UTF-8"),
        (b"a = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b"a = " + b"{b = " * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
    ],
)
def test_a_file_that_is_not_toml_text_is_a_config_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "antiphon.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        resolve("--config", str(path))
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_config_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        resolve("--config", str(tmp_path))


def test_voices_and_lookahead_from_flags() -> None:
    from server.live.voices import VoicePolicy

    cfg = resolve("--voices", "per-sender", "--max-voices", "4", "--voice-timeout", "9", "--lookahead", "0.05")
    assert (cfg.voices, cfg.max_voices, cfg.voice_timeout, cfg.lookahead) == (VoicePolicy.PER_SENDER, 4, 9.0, 0.05)
    assert resolve().voices is VoicePolicy.ONE and resolve().lookahead == 0.0
