"""config.yaml: the issue-3 example loads, defaults fill the rest, every mistake names key, file and fix."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from ihd_node.config import Config, ConfigError, default_config, load_config, reference_markdown
from ihd_node.config.fields import model_in, tagged_models
from ihd_node.store import RetryPolicy

ROOT = Path(__file__).resolve().parents[1]

# Verbatim from issue 3 (external checks write configs with exactly these keys).
ISSUE3 = """\
node:        {ae_title: IHD_AI, host: 0.0.0.0, port: 11112, allowed_calling_aets: []}
storage:     {dir: /var/lib/ihd-node}
database:    {url: "sqlite:////var/lib/ihd-node/ihd.sqlite"}
series:      {quiet_seconds: 2}
destinations:
  - {name: pacs, ae_title: PACS, host: 127.0.0.1, port: 4242}
model:       {checkpoint: default, device: auto}
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def with_node(extra: str) -> str:
    """The issue-3 example with more keys in its node section."""
    return ISSUE3.replace("allowed_calling_aets: []", f"allowed_calling_aets: [], {extra}")


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert str(path) in message  # every message names the file
    return message


def test_issue3_example_loads_with_defaults_for_the_rest(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ISSUE3))
    assert config.node.ae_title == "IHD_AI" and config.node.port == 11112 and config.node.host == "0.0.0.0"
    assert config.node.allowed_calling_aets == []
    assert config.storage.dir == Path("/var/lib/ihd-node")
    assert config.database_url == "sqlite:////var/lib/ihd-node/ihd.sqlite"
    assert config.series.quiet_seconds == 2
    [dest] = config.destinations
    assert (dest.name, dest.ae_title, dest.host, dest.port) == ("pacs", "PACS", "127.0.0.1", 4242)
    assert config.model.checkpoint == "default" and config.model.device == "auto"
    # Everything beyond the issue's keys has a default.
    assert config.series.max_wait_seconds == 120 and config.series.modalities == ["CT"]
    assert config.node.tls.enabled is False and config.node.max_associations == 10
    assert config.analysis.max_queue == 32 and config.delivery.retry_initial_seconds == 5
    assert config.retention.spool_keep_hours == 24 and config.storage.min_free_mb == 1024
    assert config.source == tmp_path / "config.yaml"


def test_shipped_example_config_loads(tmp_path: Path) -> None:
    text = (ROOT / "config.yaml").read_text()
    config = load_config(ROOT / "config.yaml")
    assert config.node.ae_title == "IHD_AI" and config.destinations[0].name == "pacs"
    # The commented "optional keys" block, uncommented and merged in, is valid too and changes nothing.
    block = text.split("# --- Optional keys", 1)[1].split("\n", 1)[1]
    optional = yaml.safe_load("\n".join(line[2:] for line in block.splitlines() if line.startswith("# ")))
    data = yaml.safe_load(text)
    for section, values in optional.items():
        data[section] = values if isinstance(values, list) else {**data.get(section, {}), **values}
    merged = load_config(write(tmp_path, yaml.safe_dump(data)))
    assert merged.model_dump() == config.model_dump()


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).node.port == 11112
    config = load_config(write(tmp_path, "node:\ndestinations:\nstorage: {dir: data}\n"))
    assert config.node.ae_title == "IHD_AI" and config.destinations == []
    # Relative paths mean "next to the config file"; the default database follows storage.dir.
    assert config.storage.dir == tmp_path.resolve() / "data"
    assert config.database_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'ihd.sqlite'}"


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    msg = error_of(tmp_path, ISSUE3.replace("quiet_seconds", "quiet_secnds"))
    assert "unknown key `series.quiet_secnds`" in msg and "did you mean `quiet_seconds`?" in msg
    msg = error_of(tmp_path, ISSUE3 + "nodes: {}\n")
    assert "unknown key `nodes`" in msg and "did you mean `node`?" in msg
    msg = error_of(tmp_path, ISSUE3.replace("port: 4242}", "port: 4242, aet: X}"))
    assert "unknown key `destinations[0].aet`" in msg


def test_bad_port(tmp_path: Path) -> None:
    msg = error_of(tmp_path, ISSUE3.replace("port: 11112", "port: 70000"))
    path = tmp_path / "config.yaml"
    assert msg == f"node.port in {path}: 70000 is not a port number (1-65535); use e.g. 11112"
    msg = error_of(tmp_path, ISSUE3.replace("port: 4242", "port: x"))
    assert 'destinations[0].port in' in msg and '"x" is not a whole number' in msg and "use e.g. 4242" in msg
    msg = error_of(tmp_path, ISSUE3.replace("port: 11112", "port: yes"))  # YAML true is no port
    assert "node.port" in msg and "true" in msg.lower()


@pytest.mark.parametrize(
    ("title", "words"),
    [("THIS_TITLE_IS_TOO_LONG", "at most 16"), ('"   "', "all spaces"), ('"IHD\\\\AI"', "backslash"),
     ('""', "empty")],
)
def test_bad_ae_title(tmp_path: Path, title: str, words: str) -> None:
    msg = error_of(tmp_path, ISSUE3.replace("ae_title: IHD_AI", f"ae_title: {title}"))
    assert msg.startswith("node.ae_title in ") and words in msg and 'use e.g. "IHD_AI"' in msg


def test_ae_titles_are_stripped_and_checked_in_lists(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ISSUE3.replace("allowed_calling_aets: []",
                                                        'allowed_calling_aets: ["PACS  ", CT1]')))
    assert config.node.allowed_calling_aets == ["PACS", "CT1"]
    assert config.node.calling_aet_allowed("PACS ") and not config.node.calling_aet_allowed("OTHER")
    msg = error_of(tmp_path, ISSUE3.replace("allowed_calling_aets: []", "allowed_calling_aets: [OK, '']"))
    assert "node.allowed_calling_aets[1]" in msg


def test_bad_cidr_and_address_check(tmp_path: Path) -> None:
    msg = error_of(tmp_path, with_node("allowed_addresses: [10.0.0.0/8, 10.1.2.300]"))
    assert msg.startswith("node.allowed_addresses[1] in ")
    assert '"10.1.2.300" is not an IP address or CIDR' in msg
    config = load_config(write(tmp_path, with_node("allowed_addresses: [10.0.0.0/8, '::1']")))
    assert config.node.address_allowed("10.9.8.7") and config.node.address_allowed("::1")
    assert not config.node.address_allowed("192.168.0.1") and not config.node.address_allowed("garbage")


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "node:\n  port: 1\n   host: x\n")
    assert "not valid YAML at line 3" in msg
    msg = error_of(tmp_path, "node:\n  port: 1\n  port: 2\n")
    assert "line 3" in msg and "`port` appears twice" in msg
    msg = error_of(tmp_path, "- a list\n")
    assert "top level must be a mapping" in msg


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_other_values(tmp_path: Path) -> None:
    cases = {
        "model:       {checkpoint: default, device: gpu}": ("model.device", "is not a device"),
        "model:       {checkpoint: missing.pt, device: auto}": ("model.checkpoint", "does not exist"),
        "series:      {quiet_seconds: 200}": ("series in", "max_wait_seconds is below quiet_seconds"),
        "series:      {quiet_seconds: 2, description_exclude: '(bone'}": ("series.description_exclude",
                                                                          "not a valid regular expression"),
    }
    for line, (key, words) in cases.items():
        prefix = line.split(":")[0]
        text = "\n".join(line if x.startswith(prefix + ":") else x for x in ISSUE3.splitlines()) + "\n"
        msg = error_of(tmp_path, text)
        assert key in msg and words in msg, msg
    msg = error_of(tmp_path, ISSUE3 + "analysis: {thresholds: {anything: 0.3}}\n")
    assert "analysis.thresholds" in msg and "unknown class `anything`" in msg
    msg = error_of(tmp_path, ISSUE3 + "logging: {level: loud}\n")
    assert "logging.level" in msg
    second = "port: 4242}\n  - {name: pacs, ae_title: B, host: h, port: 1}"
    msg = error_of(tmp_path, ISSUE3.replace("port: 4242}", second))
    assert "destinations in" in msg and "`pacs` is used twice" in msg


def test_tls_needs_its_files(tmp_path: Path) -> None:
    msg = error_of(tmp_path, with_node("tls: {enabled: true}"))
    assert "node.tls in" in msg and "certificate or private_key is not set" in msg
    (tmp_path / "node.crt").write_text("x")
    msg = error_of(tmp_path, with_node("tls: {enabled: true, certificate: node.crt, private_key: node.key}"))
    assert "node.tls.private_key" in msg and "does not exist" in msg
    (tmp_path / "node.key").write_text("x")
    config = load_config(tmp_path / "config.yaml")
    assert config.node.tls.certificate == tmp_path.resolve() / "node.crt"


def test_several_problems_in_one_message(tmp_path: Path) -> None:
    text = ISSUE3.replace("port: 11112", "port: 0").replace("ae_title: PACS", "ae_title: ''")
    msg = error_of(tmp_path, text)
    assert msg.startswith("2 problems in ") and "node.port" in msg and "destinations[0].ae_title" in msg


def test_default_config_in_code(tmp_path: Path) -> None:
    pacs = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 5105}
    config = default_config(tmp_path, node={"port": 5104}, destinations=[pacs])
    assert isinstance(config, Config)
    assert config.node.port == 5104 and config.node.ae_title == "IHD_AI"
    assert config.storage.spool_dir == tmp_path / "spool"
    assert config.database_url == f"sqlite:///{tmp_path / 'ihd.sqlite'}"
    with pytest.raises(ConfigError, match="node.port in default_config"):
        default_config(tmp_path, node={"port": 0})


def test_backoff_doubles_and_caps() -> None:
    """The delivery settings drive the one retry policy (deliveries and alerts alike)."""
    policy = RetryPolicy.of(default_config("/tmp").delivery)
    assert [policy.backoff(n) for n in (1, 2, 3, 10)] == [5, 10, 20, 300]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "ihd-node"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_check_config_command(tmp_path: Path) -> None:
    good = write(tmp_path, ISSUE3, "good.yaml")
    proc = run_cli("check-config", str(good))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{good}: OK")
    assert "IHD_AI" in proc.stdout and "11112" in proc.stdout and "pacs = PACS@127.0.0.1:4242" in proc.stdout

    bad = write(tmp_path, ISSUE3.replace("port: 11112", "port: 70000"), "bad.yaml")
    proc = run_cli("check-config", str(bad))
    assert proc.returncode == 2
    assert f"node.port in {bad}: 70000 is not a port number" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""

    proc = run_cli("check-config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_docs_reference_matches_the_model() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    start, end = "<!-- reference:start -->\n", "<!-- reference:end -->"
    assert start in doc and end in doc
    table = doc.split(start, 1)[1].split(end, 1)[0]
    assert table.strip() == reference_markdown().strip(), (
        "docs/configuration.md is out of date; regenerate the table with "
        "`.venv/bin/python -c 'from ihd_node.config import reference_markdown; print(reference_markdown())'`")
    # And every field of every section is named there (belt and braces for hand edits around the table).
    for key in all_keys(Config, ""):
        assert f"`{key}" in doc, key


def all_keys(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append(key)
        kinds = tagged_models(info.annotation)
        for tag, kind_model in kinds.items():  # destinations: each kind's keys
            out += all_keys(kind_model, f"{key}[kind={tag}].")
        sub = model_in(info.annotation)
        if sub is not None and not kinds:
            out += all_keys(sub, key + ("[]." if typing.get_origin(info.annotation) is list else "."))
    return out
