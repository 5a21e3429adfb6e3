"""Channel settings an operator can read: every problem with its settings path and what is expected, in
`rulesvc check`, `rulesvc plugins`, the start-up log and `GET /v1/channels`; plugins listed with their
kind, and jobs with their last run or last error."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from rulesvc_ads import AdsSettings, AudienceSync
from rulesvc_email import EmailSettings

from rulesvc import hookimpl
from rulesvc.channels import JOB, ChannelSettingsError, read_settings, status_of
from rulesvc.config import Settings
from rulesvc.default_plugins.builtin import BUILTIN_PLUGINS
from rulesvc.plugins import channel_settings_reference, load_plugins
from rulesvc.web.app import create_app
from tests.helpers import eventually
from tests.service import ServiceProcess

DOCS = Path(__file__).parent.parent / "docs" / "channels.md"
KNOWN_EMAIL = (
    "known: ca_file, dkim_domain, dkim_private_key, dkim_private_key_file, dkim_selector, from, host, "
    "password, port, quiet_hours, reply_to, security, timeout, unsubscribe_mailto, unsubscribe_url, username"
)
TYPO = f"channels.email.smtp_prot: unknown setting; did you mean `port`? ({KNOWN_EMAIL})"
PORT = 'channels.email.port: expected an integer from 1 to 65535, got "abc"'
HOST = "channels.email.host: required (the SMTP server to send through)"
FROM = "channels.email.from: required (the sender: an address, or `Name <address>`)"
SECRET = "hunter2-do-not-print"


def rulesvc(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RULESVC_", "MONGODB_URI"))}
    return subprocess.run(
        [sys.executable, "-m", "rulesvc", *args], cwd=cwd, env={**clean, **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "rulesets").mkdir()
    return tmp_path


def test_check_and_plugins_print_every_problem_of_the_toml_file(workdir: Path) -> None:
    (workdir / "rulesvc.toml").write_text('[channels.email]\nsmtp_prot = 25\nport = "abc"\n')
    env = {"RULESVC_CONFIG": str(workdir / "rulesvc.toml"), "RULESVC_DATA_DIR": str(workdir / "data")}
    check = rulesvc("check", "rulesets", cwd=workdir, env=env)
    assert check.returncode == 1, check.stderr
    assert check.stdout.splitlines()[:3] == [TYPO, PORT, HOST]
    assert "Traceback" not in check.stderr + check.stdout

    listing = rulesvc("plugins", cwd=workdir, env=env)
    assert listing.returncode == 1
    lines = listing.stdout.splitlines()
    email = lines.index(next(line for line in lines if line.startswith("  email ")))
    assert lines[email].split() == ["email", "message", "channel", "NOT", "CONFIGURED", "settings:"]
    assert [line.strip() for line in lines[email + 1 : email + 4]] == [TYPO, PORT, HOST]
    assert "pip install" not in listing.stdout  # a wrong setting is not a missing plugin
    assert not (workdir / "data").exists()  # listing plugins starts no database


def test_check_reads_the_environment_too(workdir: Path) -> None:
    env = {"RULESVC_CHANNEL_EMAIL_PORT": "abc", "RULESVC_CHANNEL_EMAIL_HOST": "smtp.example",
           "RULESVC_CHANNEL_EMAIL_FROM": "news@shop.example", "RULESVC_CHANNEL_EMAIL_TIMEOUT": "2.5",
           "RULESVC_CHANNEL_EMAIL_QUIET_HOURS": "false"}  # fmt: skip
    check = rulesvc("check", "rulesets", cwd=workdir, env=env)
    assert (check.returncode, check.stdout.splitlines()) == (1, [PORT])
    env["RULESVC_CHANNEL_EMAIL_PORT"] = "2525"  # environment strings convert to the setting's type
    check = rulesvc("check", "rulesets", cwd=workdir, env=env)
    assert (check.returncode, check.stdout) == (0, "")
    listing = rulesvc("plugins", cwd=workdir, env=env)
    assert "  email                  message channel  configured      SMTP smtp.example:2525 (STARTTLS)" in (
        listing.stdout.splitlines()
    )


def test_a_typo_in_a_built_in_channel_section_is_an_error(workdir: Path) -> None:
    (workdir / "rulesvc.toml").write_text("[channels.inapp]\nquiet_hour = true\n")
    check = rulesvc("check", "rulesets", cwd=workdir, env={"RULESVC_CONFIG": str(workdir / "rulesvc.toml")})
    assert (check.returncode, check.stdout.splitlines()) == (
        1,
        ["channels.inapp.quiet_hour: unknown setting; did you mean `quiet_hours`? (known: quiet_hours)"],
    )


def test_settings_for_an_unknown_channel_are_a_warning(workdir: Path) -> None:
    (workdir / "rulesvc.toml").write_text('[channels.emial]\nhost = "smtp.example"\n')
    env = {"RULESVC_CONFIG": str(workdir / "rulesvc.toml"), "RULESVC_CHANNEL_WEBHOK_URL": "https://x.example"}
    check = rulesvc("check", "rulesets", cwd=workdir, env=env)
    assert check.returncode == 0
    assert check.stdout.splitlines() == [
        "warning: settings for unknown channel `emial`; did you mean `email`?",
        "warning: settings for unknown channel `webhok` (RULESVC_CHANNEL_WEBHOK_URL); "
        "did you mean `webhook`?",
    ]


def test_secret_values_are_never_printed(workdir: Path) -> None:
    (workdir / "rulesvc.toml").write_text(
        f'[channels.email]\nhost = "h"\nfrom = "a@b.c"\npassword = ["{SECRET}"]\npasswrod = "{SECRET}"\n'
        f'[channels.sms]\nauth_token = 4242424242\naccount_sid = "AC1"\nfrom = "+15005550006"\n'
    )
    env = {"RULESVC_CONFIG": str(workdir / "rulesvc.toml")}
    for command in ("check", "plugins"):
        out = rulesvc(command, *(["rulesets"] if command == "check" else []), cwd=workdir, env=env)
        assert out.returncode == 1
        assert "channels.email.password: expected a string, got a list" in out.stdout
        assert "channels.email.passwrod: unknown setting; did you mean `password`?" in out.stdout
        assert "channels.sms.auth_token: expected a string, got a number" in out.stdout
        assert SECRET not in out.stdout + out.stderr and "4242424242" not in out.stdout + out.stderr


def test_serve_logs_each_problem_and_keeps_running(workdir: Path) -> None:
    """A real `rulesvc serve`: one `channel.settings_invalid` line per problem, no secret in the log,
    the email channel listed as not configured; the ads job runs, and `rulesvc plugins` shows its run."""
    (workdir / "rulesvc.toml").write_text(
        '[channels.email]\nsmtp_prot = 25\nport = "abc"\npassword = 7331337\n'
        '[channels.ads]\nbase_url = "http://127.0.0.1:9"\ntoken = "t"\ninterval = 0.5\n'
        '[channels.emial]\nhost = "h"\n'
    )
    service = ServiceProcess(workdir, env={"RULESVC_CONFIG": str(workdir / "rulesvc.toml")})
    service.env = {k: v for k, v in service.env.items() if not k.startswith("RULESVC_CHANNEL_")}
    service.start()
    try:
        invalid = [line for line in service.log_lines() if line.get("event") == "channel.settings_invalid"]
        assert [(line["level"], line["channel"], line["problem"]) for line in invalid] == [
            ("error", "email", TYPO),
            ("error", "email", PORT),
            ("error", "email", "channels.email.password: expected a string, got a number"),
            ("error", "email", HOST),
            ("error", "email", FROM),
        ]
        assert "7331337" not in service.log()
        unknown = [line for line in service.log_lines() if line.get("event") == "channel.settings_unknown"]
        assert [(line["level"], line["problem"]) for line in unknown] == [
            ("warning", "settings for unknown channel `emial`; did you mean `email`?")
        ]
        status, body = service.request("GET", "/v1/channels")
        assert status == 200
        email = next(c for c in body["channels"] if c["name"] == "email")
        assert email["configured"] is False and email["kind"] == "message channel"
        assert email["detail"].startswith(f"settings: {TYPO}; {PORT}; ")
        deadline = time.monotonic() + 30
        while True:
            listing = service.cli("plugins")
            if "last run: 20" in listing.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        lines = listing.stdout.splitlines()
        job = lines.index(next(line for line in lines if line.startswith("  ads-audience-sync")))
        assert lines[job].split()[1:4] == ["audience", "sync", "configured"]
        ran = lines[job + 1].strip()
        assert ran.startswith("last run: ") and ran.endswith(" s"), listing.stdout
        at = datetime.strptime(ran.split()[2].rstrip(","), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - at).total_seconds()) < 60
    finally:
        service.stop()


class FlakyJob:
    name = "flaky-export"
    interval = 0.2

    async def run(self, data: Any) -> None:
        raise RuntimeError("the export server said no")


class FlakyPlugin:
    @hookimpl
    def register_jobs(self, register: Any, config: Any) -> None:
        """A job written before kinds and statuses existed: still listed, as a plain job."""
        register(FlakyJob())


async def test_get_channels_shows_settings_errors_kinds_and_last_runs(
    make_client: Any, aiohttp_server: Any, settings: Settings
) -> None:
    channels = {
        "email": {"smtp_prot": 25, "port": "abc"},
        "ads": {"base_url": "http://127.0.0.1:9", "token": "t", "interval": 0.2},
    }
    started = datetime.now(UTC)
    app = create_app(msgspec.structs.replace(settings, channels=channels, plugins=["ads", "email"]))
    client = await make_client(app)

    async def listing() -> dict[str, Any]:
        resp = await client.get("/v1/channels")
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]

    body = await listing()
    email = next(c for c in body["channels"] if c["name"] == "email")
    assert email["configured"] is False
    assert email["detail"] == f"settings: {TYPO}; {PORT}; {HOST}; {FROM}"
    plugins = {p["name"]: p for p in body["plugins"]}
    assert plugins["email"]["settings_errors"][:2] == [TYPO, PORT]
    assert plugins["email"]["error"] is None  # the plugin loaded; its settings are wrong
    assert [(p["name"], p["kind"], p["configured"]) for p in plugins["email"]["provides"]] == [
        ("email", "message channel", False)
    ]
    assert [p["name"] for p in plugins["builtin"]["provides"]] == ["log", "inapp", "sms", "push", "webpush",
                                                                   "webhook"]  # fmt: skip

    async def ads_ran() -> bool:
        [job] = next(p for p in (await listing())["plugins"] if p["name"] == "ads")["provides"]
        return job["last_run"] is not None

    await eventually(ads_ran)
    [job] = next(p for p in (await listing())["plugins"] if p["name"] == "ads")["provides"]
    assert (job["name"], job["kind"], job["configured"]) == ("ads-audience-sync", "audience sync", True)
    ran_at = datetime.fromisoformat(job["last_run"]["at"])
    assert started <= ran_at <= datetime.now(UTC) and job["last_run"]["duration_seconds"] >= 0
    assert job["last_error"] is None


async def test_a_job_that_raises_shows_its_last_error(make_client: Any, settings: Settings) -> None:
    registry, reports = load_plugins([*BUILTIN_PLUGINS, ("flaky", FlakyPlugin())], only=[], environ={})
    client = await make_client(create_app(settings, registry, reports))

    async def failed() -> bool:
        body = await (await client.get("/v1/channels")).json()
        [job] = next(p for p in body["plugins"] if p["name"] == "flaky")["provides"]
        return job["last_error"] is not None

    await eventually(failed)
    body = await (await client.get("/v1/channels")).json()
    [job] = next(p for p in body["plugins"] if p["name"] == "flaky")["provides"]
    assert (job["kind"], job["configured"], job["last_run"]) == (JOB, True, None)
    assert job["last_error"]["message"] == "RuntimeError: the export server said no"


def test_a_settings_struct_takes_environment_strings_and_reports_everything() -> None:
    env = {"port": "2525", "timeout": "1.5", "quiet_hours": "no", "host": "h", "from": "a@b.c"}
    settings = read_settings("email", env, EmailSettings)
    assert (settings.port, settings.timeout, settings.quiet_hours) == (2525, 1.5, False)
    with pytest.raises(ChannelSettingsError) as wrong:
        AudienceSync({"interval": "-1", "batch_size": "0", "tokn": "x"})  # the mode's needs come last
    assert wrong.value.problems == [
        'channels.ads.interval: expected a number > 0, got "-1"',
        'channels.ads.batch_size: expected an integer >= 1, got "0"',
        "channels.ads.tokn: unknown setting; did you mean `token`? (known: access_token, api_version, "
        "audiences, base_url, batch_size, graph_url, interval, mode, platform, timeout, token)",
        "channels.ads.base_url: required in `webhook` mode (the provider's API; changes go to "
        "`{base_url}/audiences/{audience}/members`)",
        "channels.ads.token: required in `webhook` mode (the bearer token the provider gave)",
    ]
    assert read_settings("ads", {}, AdsSettings) == AdsSettings()  # no section: not configured, no error


def test_the_docs_carry_the_generated_settings_reference() -> None:
    reference = channel_settings_reference()
    for name in ("email", "sms", "push", "webpush", "webhook", "ads"):
        assert f"### channels.{name}\n" in reference
    assert "| `port` | integer from 1 to 65535 | `587` | `RULESVC_CHANNEL_EMAIL_PORT` |" in reference
    assert reference in DOCS.read_text()  # regenerate: python -c 'from rulesvc.plugins import ...'


def test_plugins_without_a_database_still_lists_and_says_the_last_run_is_unknown(workdir: Path) -> None:
    env = {
        "MONGODB_URI": "mongodb://127.0.0.1:9/?directConnection=true",
        "RULESVC_MONGODB_TIMEOUT_SECONDS": "1",
        "RULESVC_CHANNEL_ADS_BASE_URL": "http://127.0.0.1:9",
        "RULESVC_CHANNEL_ADS_TOKEN": "t",
    }
    listing = rulesvc("plugins", cwd=workdir, env=env)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    job = lines.index(next(line for line in lines if line.startswith("  ads-audience-sync")))
    assert (
        lines[job + 1].strip()
        == "last run: unknown (the database did not answer (ServerSelectionTimeoutError))"
    )
    assert "Traceback" not in listing.stderr


def test_a_job_with_wrong_settings_keeps_its_name_and_kind_and_never_runs() -> None:
    registry, reports = load_plugins(
        BUILTIN_PLUGINS, {"ads": {"base_url": "http://x", "token": "t", "interval": "hourly"}}, ["ads"], {}
    )
    [job] = registry.jobs
    assert (job.name, getattr(job, "kind", None)) == ("ads-audience-sync", "audience sync")
    assert status_of(job) == (False, 'settings: channels.ads.interval: expected a number > 0, got "hourly"')
    [ads] = [r for r in reports if r.name == "ads"]
    assert (ads.error, ads.jobs) == (None, ["ads-audience-sync"])
