"""No secret reaches the log through a traceback: a failing backtest job's process holds the settings
(channel secrets) and the MongoDB URI (a password), and a traceback that shows the frames' locals, as
rich's does by default, printed them."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from rulesvc.config import Settings
from rulesvc.replay.backtest import Options, Window
from rulesvc.runtime.backtests import HANDOFF_ENCODER, Handoff
from rulesvc.store.mongod import EmbeddedMongod

PASSWORD = "S3cretPw4242"
TOKEN = "tw_tok_ABCDEF123456"


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_a_failing_backtest_job_logs_its_traceback_without_secrets(
    mongod: EmbeddedMongod, settings: Settings, log_format: str
) -> None:
    # A user the server does not know: the job fails at its first query, in `run(handoff)`.
    uri = mongod.uri.replace("mongodb://", f"mongodb://admin:{PASSWORD}@", 1)
    now = datetime.now(UTC)
    handoff = Handoff(
        job_id="j1",
        settings=Settings(
            mongodb_uri=uri,
            database=settings.database,
            log_format=log_format,
            mongodb_timeout_seconds=1,
            channels={"sms": {"auth_token": TOKEN, "account_sid": "AC1"}},
        ),
        mongo_uri=uri,
        baseline_label="b",
        baseline=[],
        candidate_label="c",
        candidate=[],
        options=Options(Window(now - timedelta(days=1), now)),
    )
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "rulesvc.runtime.backtest_job", str(os.getpid())],
        input=HANDOFF_ENCODER.encode(handoff), capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    err = result.stderr.decode()
    assert "backtest.failed" in err and "Authentication failed" in err, err  # the traceback is there
    assert PASSWORD not in err and TOKEN not in err, err
