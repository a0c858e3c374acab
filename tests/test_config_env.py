"""The command line and the environment: every option has a variable, --help tells the truth, README agrees."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from inference.config import (ENVIRONMENT, AppConfig, build_parser, config_from_args, exposure_warning, log_level,
                              parse_size)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def options() -> list[argparse.Action]:
    return [action for action in build_parser()._actions if action.dest != "help"]


# ----- the environment --------------------------------------------------------------------------------------------
def test_every_option_has_an_environment_variable():
    assert {action.dest for action in options()} == set(ENVIRONMENT)


def test_logins_come_from_llm_auth():
    config = config_from_args([], env={"LLM_AUTH": "alice:pw1,bob:pw2"})
    assert config.auth == [("alice", "pw1"), ("bob", "pw2")]
    assert config_from_args(["--auth", "alice:pw1", "--auth", "bob:pw2"], env={}).auth == config.auth


def test_the_command_line_wins_over_the_environment():
    env = {"LLM_AUTH": "alice:pw1", "LLM_MAX_CONTEXT": "2048", "GRADIO_SERVER_PORT": "9000"}
    config = config_from_args(["--auth", "carol:pw3", "--max-context", "1024"], env=env)
    assert config.auth == [("carol", "pw3")] and config.max_context == 1024 and config.port == 9000


def test_each_setting_reads_from_the_environment():
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8080", "LLM_DATA_DIR": "/srv/llm",
           "LLM_MEMORY_BUDGET": "2GiB", "LLM_IDLE_UNLOAD": "off", "LLM_API_KEY": "k", "LLM_SHARE": "1",
           "LLM_REMOTE": "a=http://h:1/v1,model=m;b=https://h2/v1", "LLM_PRELOAD": "0", "LLM_MAX_CONCURRENT": "3",
           "LLM_MAX_QUEUE": "5", "LLM_MAX_TOKENS_LIMIT": "77", "LLM_MAX_PROMPT_CHARS": "1234",
           "LLM_MAX_UPLOAD": "2MiB", "LLM_MAX_FILES": "6", "LLM_PARSE_TIMEOUT": "9s", "LLM_BATCHING": "false",
           "LLM_PREFIX_CACHE": "no", "LLM_MAX_CONTEXT": "1024", "LLM_WEIGHTS": "dense"}
    config = config_from_args([], env=env)
    assert (config.host, config.port, config.data_dir, config.memory_budget, config.idle_unload_s) == (
        "0.0.0.0", 8080, Path("/srv/llm"), 2 * 2**30, None)
    assert (config.api_key, config.share, config.remotes, config.preload) == (
        "k", True, ["a=http://h:1/v1,model=m", "b=https://h2/v1"], False)
    assert (config.max_concurrent_generations, config.max_queue, config.max_tokens_limit, config.max_prompt_chars,
            config.max_upload_bytes, config.max_files_per_session, config.parse_timeout_s) == (
        3, 5, 77, 1234, 2 * 2**20, 6, 9.0)
    assert (config.batching, config.prefix_cache, config.max_context, config.weights) == (False, False, 1024, "dense")


def test_nothing_set_gives_the_defaults():
    assert config_from_args([], env={}) == AppConfig()


@pytest.mark.parametrize("variable, value, words", [
    ("LLM_AUTH", "alice", "USER:PASS"),
    ("LLM_AUTH", "local:pw", "reserved"),
    ("LLM_MEMORY_BUDGET", "lots", "not a size"),
    ("LLM_PRELOAD", "maybe", "yes/no"),
    ("LLM_WEIGHTS", "fp8", "not one of"),
    ("LLM_REMOTE", "far=gpu-box:8000", "--remote wants"),
    ("GRADIO_SERVER_PORT", "http", "invalid literal"),
])
def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(capsys, variable, value, words):
    with pytest.raises(SystemExit) as info:
        config_from_args([], env={variable: value})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert variable in err and words in err and "Traceback" not in err


def test_log_level_is_checked(capsys):
    assert log_level({}) == "INFO" and log_level({"LOG_LEVEL": "debug"}) == "DEBUG"
    with pytest.raises(SystemExit):
        log_level({"LOG_LEVEL": "loud"})
    assert "LOG_LEVEL" in capsys.readouterr().err


# ----- --help ---------------------------------------------------------------------------------------------------
def test_help_states_each_default_once_and_its_variable():
    for action in options():
        assert action.help.count("(default: ") == 1, action.option_strings
        assert ENVIRONMENT[action.dest][0] in action.help, action.option_strings
    text = build_parser().format_help()
    for wrong in ("(default: True)", "(default: False)", "(default: [])", "(default: None)"):
        assert wrong not in text
    assert "LOG_LEVEL" in text


def test_the_upload_limit_help_states_is_the_one_used():
    action = next(action for action in options() if action.dest == "max_upload")
    stated = re.search(r"\(default: ([^;]+);", action.help).group(1)
    assert parse_size(stated) == AppConfig().max_upload_bytes == config_from_args([], env={}).max_upload_bytes


# ----- exposure ---------------------------------------------------------------------------------------------------
def test_an_open_app_on_the_network_gets_one_warning():
    assert exposure_warning(AppConfig()) is None  # loopback: this machine only
    assert exposure_warning(AppConfig(host="0.0.0.0", auth=[("a", "b")], api_key="k")) is None
    open_both = exposure_warning(AppConfig(host="0.0.0.0"))
    assert "0.0.0.0" in open_both and "LLM_AUTH" in open_both and "LLM_API_KEY" in open_both
    no_key = exposure_warning(AppConfig(host="0.0.0.0", auth=[("a", "b")]))
    assert "LLM_API_KEY" in no_key and "LLM_AUTH" not in no_key
    no_login = exposure_warning(AppConfig(host="0.0.0.0", api_key="k"))
    assert "LLM_AUTH" in no_login and "LLM_API_KEY" not in no_login
    assert "share link" in exposure_warning(AppConfig(share=True))


# ----- README ---------------------------------------------------------------------------------------------------
def test_readme_names_every_option_and_variable():
    for action in options():
        for flag in action.option_strings:
            assert f"`{flag}" in README, flag
        assert f"`{ENVIRONMENT[action.dest][0]}" in README, action.dest
    for extra in ("LOG_LEVEL", "HF_HUB_OFFLINE", 'LLM_AUTH="alice:pw1,bob:pw2"'):
        assert extra in README, extra


def test_the_space_front_matter_pins_a_gradio_of_the_requirements():
    front = README.split("---")[1]
    pinned = re.search(r'^sdk_version:\s*"?([0-9.]+)"?\s*$', front, re.M)
    assert pinned, "no sdk_version in README's front matter"
    line = next(line for line in (ROOT / "requirements.txt").read_text().splitlines()
                if re.match(r"gradio\s*[<>=!~]", line))
    assert Requirement(line).specifier.contains(pinned.group(1)), (pinned.group(1), line)
