"""Configuration is validated once, naming the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import errors
from workflows import plan as planning
from workflows import settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"


def test_the_example_configuration_is_valid() -> None:
    """config.example.yaml loads, and its values are the defaults it claims."""
    loaded = settings.load(str(EXAMPLE))
    defaults = settings.from_mapping({})
    assert loaded.policies == defaults.policies == planning.Policies()
    assert loaded.runner.timeouts_s == defaults.runner.timeouts_s
    assert loaded.runner.retry_attempts == 3
    assert loaded.sim_file == str(EXAMPLE.parent / "cluster.json")  # relative to the file


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"backend": {"kind": "hyperv"}}, "backend.kind: must be one of simulated, vmm, failover"),
        ({"retries": {"attempts": 0}}, "retries.attempts: must be greater than 0"),
        ({"retries": {"attempts": True}}, "retries.attempts: must be an integer"),
        ({"timeouts_s": {"Patching": -1}}, "timeouts_s.Patching: must be greater than 0"),
        ({"timeouts_s": {"Done": 1}}, "timeouts_s.Done: unknown key"),
        ({"patcher": {"kind": "magic"}}, "patcher.kind: must be one of"),
        ({"backend": {"vmm": "server"}}, "backend.vmm: must be a mapping"),
    ],
)
def test_invalid_values_name_their_key(data: dict[str, object], message: str) -> None:
    """Each invalid value is reported with its dotted path."""
    with pytest.raises(errors.ConfigError, match=message.replace(".", r"\.")):
        settings.from_mapping(data)


def test_auto_patcher_is_simulated_only_on_the_simulator() -> None:
    """`auto` records the simulated patcher on the simulator and `external` elsewhere."""
    assert settings.from_mapping({}).patcher_for_runs() == "simulated"
    block = {"server": "vmm01", "username": "svc", "password_env": "NODEPATCH_TEST_UNSET"}
    vmm = settings.from_mapping({"backend": {"kind": "vmm", "vmm": block}})
    assert vmm.patcher_for_runs() == "external"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A configuration path that does not exist is reported as such."""
    with pytest.raises(errors.ConfigError, match="cannot read configuration"):
        settings.load(str(tmp_path / "nope.yaml"))


def test_timeouts_are_per_workflow_and_the_flat_keys_still_work() -> None:
    from workflows.settings import from_mapping

    nested = from_mapping({"timeouts_s": {"node_patch": {"Draining": 60}}})
    flat = from_mapping({"timeouts_s": {"Draining": 60}})
    assert nested.runner_for("node_patch").timeout("Draining") == 60
    assert flat.runner_for("node_patch").timeout("Draining") == 60
    with pytest.raises(errors.ConfigError, match=r"timeouts_s\.node_patch\.Drain: unknown state"):
        from_mapping({"timeouts_s": {"node_patch": {"Drain": 60}}})
    with pytest.raises(errors.ConfigError, match=r"timeouts_s\.cycle: unknown key"):
        from_mapping({"timeouts_s": {"cycle": {"Soak": 60}}})


def test_the_defaults_without_a_file_are_an_empty_files() -> None:
    """`load(None)` builds the defaults without the configuration models, and they are exactly
    what an empty configuration file gives."""
    assert settings.load(None) == settings.from_mapping({})
    assert settings.load(None).runner == settings.from_mapping({}).runner


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"backend": {"kind": "vmm"}}, "backend.vmm: required"),
        ({"patcher": {"kind": "reboot"}}, "patcher.reboot: required"),
        ({"backend": {"kind": 3}}, "backend.kind: must be one of simulated, vmm, failover (got 3)"),
        ({"policies": {"nonha": 1}}, "policies.nonha: unknown key (known: non_ha, stopped_ha,"),
        ({"retries": {"backoff_s": 0}}, "retries.backoff_s: must be greater than 0 (got 0)"),
        ({"database": 5}, "database: must be a string (got 5)"),
        (
            {"patcher": {"kind": "script", "script": {"connection": {"username": "u"}}}},
            "patcher.script.connection.password_env: give password_env or password_file",
        ),
    ],
)
def test_the_models_errors_are_one_line_naming_the_key(
    data: dict[str, object], message: str
) -> None:
    """Errors of the model tree (discriminated backends and patchers, unknown keys listing the
    known ones, limits) read like the hand-written ones did: the dotted key, then what is wrong."""
    with pytest.raises(errors.ConfigError) as caught:
        settings.from_mapping(data)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_a_database_password_is_kept_secret_in_the_model() -> None:
    """A database URL (which may hold a password) is a SecretStr in the validated model."""
    loaded = settings.from_mapping({"database": "postgresql://u:hunter2@db/n"})
    assert loaded.database == "postgresql://u:hunter2@db/n"
    assert "hunter2" not in repr(loaded.model)


def test_retries_are_per_workflow_and_state_over_the_flat_keys() -> None:
    """`retries.node_patch.Draining` sets that step's retries; the keys it leaves out and the
    other steps keep the flat `retries` values; unknown workflows and states name their key."""
    from engine.runner import Retry
    from workflows.settings import from_mapping

    loaded = from_mapping(
        {
            "retries": {
                "attempts": 4,
                "backoff_s": 2,
                "node_patch": {"Draining": {"attempts": 7, "backoff_max_s": 9}},
            }
        }
    )
    runner = loaded.runner_for("node_patch")
    assert runner.retry("Draining") == Retry(attempts=7, backoff_s=2.0, backoff_max_s=9.0)
    assert runner.retry("Patching") == Retry(attempts=4, backoff_s=2.0, backoff_max_s=120.0)
    assert runner.retry("Draining").delay(3) == 8.0
    assert runner.retry("Draining").delay(5) == 9.0  # capped
    flat = from_mapping({"retries": {"attempts": 5}}).runner_for("node_patch")
    assert flat.retry("Draining") == Retry(attempts=5)
    for bad, message in [
        ({"cycle": {"Soak": {"attempts": 2}}}, r"retries\.cycle: unknown key"),
        ({"node_patch": {"Drain": {"attempts": 2}}}, r"retries\.node_patch\.Drain: unknown state"),
        (
            {"node_patch": {"Draining": {"attempts": 0}}},
            r"retries\.node_patch\.Draining\.attempts: must be greater than 0",
        ),
        ({"node_patch": {"Draining": {"tries": 2}}}, r"retries\.node_patch\.Draining\.tries"),
    ]:
        with pytest.raises(errors.ConfigError, match=message):
            from_mapping({"retries": bad})


@pytest.mark.parametrize(
    ("cycle", "message"),
    [
        ({"soak": "soon"}, "cycle.soak: 'soon' is not a duration"),
        ({"max_parallel": 0}, "cycle.max_parallel: must be an integer of at least 1 (got 0)"),
        ({"orderr": "name"}, "cycle.orderr: unknown key (known: order, max_parallel,"),
        ({"windows": ["Sat 25:00/1h"]}, "cycle.windows[0]: 'Sat 25:00/1h': 25:00 is not a time"),
        ({"headroom_percent": 120}, "cycle.headroom_percent: must be between 0 and 99"),
        ({"on_node_failure": "ignore"}, "cycle.on_node_failure: must be one of"),
    ],
)
def test_the_cycle_section_is_checked_naming_the_key(
    cycle: dict[str, object], message: str
) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        settings.from_mapping({"cycle": cycle})
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_cycle_section_gives_the_cycle_its_defaults() -> None:
    loaded = settings.from_mapping(
        {"cycle": {"max_parallel": "auto", "soak": "15m", "windows": ["Sat 22:00/8h UTC"]}}
    )
    assert loaded.cycle == {"max_parallel": None, "soak_s": 900.0, "windows": ["Sat 22:00/8h UTC"]}


def test_the_simulated_patcher_may_take_no_time_at_all() -> None:
    """patch_seconds: 0 is the zero-latency simulator of the benchmarks; below 0 is refused."""
    zero = {"patcher": {"kind": "simulated", "simulated": {"patch_seconds": 0}}}
    assert settings.from_mapping(zero).patcher_options == {"patch_seconds": 0}
    with pytest.raises(errors.ConfigError, match="patch_seconds: must be at least 0"):
        settings.from_mapping({"patcher": {"simulated": {"patch_seconds": -1}}})
