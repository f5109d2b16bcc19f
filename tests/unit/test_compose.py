"""compose.yml, Procfile.dev and the Makefile stay in step with the code they run."""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP = sorted(name for name, service in SERVICES.items() if "build" in service)
PROCESSES = ("api", "relay", "worker")
FIELDS = {name.upper() for name in Settings.model_fields}
NEEDED = {"DATABASE_URL", "RABBITMQ_URL", "REDIS_URL", "SMTP_HOST", "SMTP_PORT"}
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def module_of(command: list[str]) -> str:
    """The module a ``python -m services.x`` command runs, or the one behind a console script."""
    if command[:2] == ["python", "-m"] and len(command) >= 3:
        return command[2]
    if command and command[0] in SCRIPTS:
        return SCRIPTS[command[0]].split(":")[0]
    raise AssertionError(f"not `python -m services.<x>` nor a console script: {command}")


def runnable(module: str) -> bool:
    """``python -m module`` would find something to run."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:  # a package: needs __main__
        return importlib.util.find_spec(f"{module}.__main__") is not None
    return True


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` as if VAR were unset; ``${VAR:?msg}`` as if it were set."""

    def replace(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        if operator and "?" in operator:
            return f"test-{name.lower()}-value"
        return default or ""

    return INTERPOLATION.sub(replace, value)


def procfile() -> dict[str, list[str]]:
    entries = {}
    for line in (ROOT / "Procfile.dev").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = shlex.split(command)
    return entries


def make_recipe(target: str) -> str:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(rf"^{target}:[^\n]*\n((?:\t[^\n]*\n)+)", makefile, flags=re.MULTILINE)
    assert match, f"no `{target}` target in the Makefile"
    return match.group(1)


def test_compose_runs_every_process_and_the_migration() -> None:
    assert set(APP) == {*PROCESSES, "migrate"}


@pytest.mark.parametrize("name", APP)
def test_app_command_runs_a_module_that_exists(name: str) -> None:
    module = module_of(argv(SERVICES[name]["command"]))
    assert module.startswith("services."), module
    assert runnable(module), f"{name}: `python -m {module}` has nothing to run"


@pytest.mark.parametrize("name", APP)
def test_app_environment_uses_only_settings_names(name: str) -> None:
    env = environment(SERVICES[name])
    unknown = set(env) - FIELDS
    assert not unknown, f"{name}: not settings of services.core.settings.Settings: {unknown}"
    assert not NEEDED - set(env), f"{name}: missing {NEEDED - set(env)}"


@pytest.mark.parametrize("name", APP)
def test_app_environment_is_valid_settings(name: str) -> None:
    values = {key.lower(): interpolate(value) for key, value in environment(SERVICES[name]).items()}
    Settings(_env_file=None, **values)


def test_api_gets_keys_and_listens_on_all_interfaces() -> None:
    env = environment(SERVICES["api"])
    assert "API_KEYS" in env
    assert env.get("API_HOST") == "0.0.0.0"


def test_api_publishes_its_port_and_checks_healthz() -> None:
    api = SERVICES["api"]
    port = int(environment(api).get("API_PORT", Settings.model_fields["api_port"].default))
    assert port == Settings.model_fields["api_port"].default
    targets = {int(str(mapping).rsplit(":", 1)[-1]) for mapping in api["ports"]}
    assert port in targets
    check = " ".join(argv(api["healthcheck"]["test"]))
    assert f"127.0.0.1:{port}/healthz" in check


@pytest.mark.parametrize("name", ["relay", "worker"])
def test_relay_and_worker_can_be_scaled(name: str) -> None:
    service = SERVICES[name]
    assert "container_name" not in service
    assert "ports" not in service


def test_processes_wait_for_a_successful_migration() -> None:
    for name in PROCESSES:
        depends = SERVICES[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["depends_on"]["mysql"]["condition"] == "service_healthy"
    assert SERVICES["migrate"].get("restart") == "no"


def test_infrastructure_has_healthchecks() -> None:
    for name in ("mysql", "rabbitmq", "redis"):
        assert SERVICES[name].get("healthcheck", {}).get("test"), name


def test_migrate_runs_what_make_migrate_runs() -> None:
    make_modules = re.findall(r"python -m ([\w.]+)", make_recipe("migrate"))
    assert make_modules, "`make migrate` runs no python module"
    assert module_of(argv(SERVICES["migrate"]["command"])) == make_modules[0]


def test_procfile_runs_the_same_processes_as_compose() -> None:
    entries = procfile()
    assert set(entries) == {*PROCESSES, "smtp"}
    for name in PROCESSES:
        module = module_of(entries[name])
        assert module == module_of(argv(SERVICES[name]["command"]))
        assert runnable(module), f"Procfile.dev {name}: `python -m {module}` has nothing to run"


def test_procfile_smtp_sink_listens_where_the_worker_delivers_by_default() -> None:
    smtp = procfile()["smtp"]
    assert smtp[:3] == ["python", "-m", "aiosmtpd"]
    listen = smtp[smtp.index("-l") + 1]
    host = Settings.model_fields["smtp_host"].default
    port = Settings.model_fields["smtp_port"].default
    assert listen == f"{host}:{port}"
    assert smtp[smtp.index("-c") + 1] == "aiosmtpd.handlers.Mailbox"
