"""The search storage is checked once, with a timeout, before any worker starts; every bad storage
is one line naming the problem (hostile item 8 of issue 12), never a traceback or a hang."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import optuna
import pytest

from dmnsp import search
from dmnsp.cli import main
from dmnsp.search import storage


def spec(url: str) -> dict:
    return {
        "version": search.SPEC_VERSION,
        "experiment": "x",
        "study_name": "storage-test",
        "storage": url,
        "direction": "maximize",
        "objective": "avg",
        "n_trials": 2,
        "workers": 1,
        "space": search.parse_space({"x": {"type": "float", "low": 0, "high": 1}}),
        "base": {},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
        "pruner": {"name": "none", "n_startup_trials": 0, "n_warmup_steps": 0},
        "heartbeat_interval": 1,
        "grace_period": 3,
        "max_retry": 2,
    }


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


@pytest.fixture
def stalled_server():
    """A server that accepts TCP connections and never says a word (a hung database)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.parametrize(
    ("url", "needles"),
    [
        (
            lambda tmp: f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/postgres",
            ["nothing listens on 127.0.0.1:", "connection refused", "start the database server"],
        ),
        (
            lambda tmp: "postgresql+psycopg://postgres@no-such-host.invalid:5432/db",
            ["the host 'no-such-host.invalid' is unknown", "check the host name"],
        ),
        (lambda tmp: "postgresql+psycopg://::garbage::/", ["is not a database URL", "give e.g."]),
        (lambda tmp: "nosuchdb://host/db", ["SQLAlchemy knows no database 'nosuchdb'"]),
        (
            lambda tmp: "mysql+pymysql://user:secret@127.0.0.1/db",
            ["the database driver 'pymysql' is not installed", "user:***@", "pip install"],
        ),
        (lambda tmp: str(tmp), ["is a folder; give the journal file's path", "study.journal"]),
        (
            lambda tmp: f"{tmp}/${{NOPE_VAR_DMNSP}}/study.journal",
            ["unset environment variable(s) NOPE_VAR_DMNSP", "export NOPE_VAR_DMNSP=..."],
        ),
        (
            lambda tmp: "postgresql+psycopg://postgres:${NOPE_PW_DMNSP}@127.0.0.1:5432/db",
            ["unset environment variable(s) NOPE_PW_DMNSP", "postgres:***@"],
        ),
        (
            lambda tmp: f"{tmp}/a-file/study.journal",
            ["cannot create the folder", "a-file", "choose a writable path"],
        ),
    ],
)
def test_bad_storage_is_one_line_before_any_study(tmp_path, monkeypatch, capsys, url, needles):
    monkeypatch.delenv("NOPE_VAR_DMNSP", raising=False)
    monkeypatch.delenv("NOPE_PW_DMNSP", raising=False)
    (tmp_path / "a-file").write_text("a file where a folder should be")
    target = url(tmp_path)
    with pytest.raises(search.SearchError) as info:
        search.create_study(spec(target))
    message = str(info.value)
    assert all(needle in message for needle in needles), message
    assert "secret" not in message and "\n" not in message
    # The same through the CLI: exit 2, one line, and no folder named after an unset variable.
    assert main(["search-create", "--spec-json", json.dumps(spec(target))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dmnsp search-create: error: search.storage") and len(err.splitlines()) == 1
    assert not any("$" in p.name for p in tmp_path.rglob("*"))


def test_a_stalled_database_fails_within_the_timeout(stalled_server, monkeypatch):
    monkeypatch.setattr(storage, "CONNECT_TIMEOUT", 1.0)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{stalled_server}/postgres"
    with pytest.raises(
        search.SearchError, match=r"cannot connect \(.*timeout.*\); check the URL and the server"
    ):
        search.create_study(spec(url))
    # Workers load the study the same way: they fail too instead of hanging.
    with pytest.raises(search.SearchError, match="timeout"):
        search.load_study(spec(url))


def test_set_variables_are_expanded_and_sqlite_gets_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DMNSP_STUDY_DIR", str(tmp_path / "studies"))
    journal = spec("${DMNSP_STUDY_DIR}/j/study.journal")
    assert search.create_study(journal)["created"] is True
    assert (tmp_path / "studies" / "j" / "study.journal").is_file()
    sqlite = spec(f"sqlite:///{tmp_path}/new/folder/study.db")  # the journal's folder is created too
    assert search.create_study(sqlite)["created"] is True
    assert optuna.study.get_all_study_names(search.open_storage(sqlite, retry=False)) == ["storage-test"]


@pytest.mark.slow
def test_a_real_postgresql_passes_the_check_and_a_wrong_database_is_named(tmp_path):
    from pg import PostgresServer, server_bindir

    if server_bindir() is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    with PostgresServer() as pg:
        assert storage.check_storage(spec(pg.url)) == pg.url
        assert search.create_study(spec(pg.url))["created"] is True
        wrong = pg.url.rsplit("/", 1)[0] + "/nosuchdb"
        with pytest.raises(search.SearchError, match=r'cannot connect \(.*"nosuchdb" does not exist'):
            storage.check_storage(spec(wrong))


def test_storage_target_expands_set_variables_only():
    assert storage.storage_target("results/x/study.journal") == "results/x/study.journal"
    assert Path(storage.storage_target("$HOME/s.journal")).is_absolute()


# ----------------------------------------------------------------------- hostile journal paths (issue 17)
def _check_within(seconds: float, target: dict) -> str:
    """check_storage's one-line error, failing the test if it takes longer than ``seconds`` (a hang)."""
    result: list = []

    def check() -> None:
        try:
            storage.check_storage(target)
            result.append("passed")
        except search.SearchError as exc:
            result.append(str(exc))

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"check_storage({target['storage']!r}) still runs after {seconds} s"
    return result[0]


def test_a_journal_path_that_is_a_fifo_or_a_link_is_refused_without_opening_it(tmp_path):
    import os

    fifo = tmp_path / "study.journal"
    os.mkfifo(fifo)
    message = _check_within(10, spec(str(fifo)))
    assert message.startswith(f"search.storage {fifo} is not a regular file") and "\n" not in message
    victim = tmp_path / "someone-elses-file"
    victim.write_text("precious\n")
    link = tmp_path / "linked.journal"
    link.symlink_to(victim)
    assert "is a symbolic link" in _check_within(10, spec(str(link)))
    (tmp_path / "dangling.journal").symlink_to(tmp_path / "nowhere" / "new-file")
    assert "is a symbolic link" in _check_within(10, spec(str(tmp_path / "dangling.journal")))
    assert victim.read_text() == "precious\n" and not (tmp_path / "nowhere").exists()


def _search_config(tmp_path: Path, url: str) -> Path:
    import yaml
    from test_search import workflow_config

    cfg = workflow_config(storage=url)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_search_study_is_created_through_the_workflow_with_variables_from_the_environment(tmp_path):
    """`${PGPASSWORD}` in search.storage, as the README's PostgreSQL example writes it, used to stop
    planning with a Snakemake WildcardError (the spec went into a params string). Now it plans, and
    the job, not the planner, expands the variables; the password reaches no file and no log."""
    import subprocess
    import sys

    from pg import PostgresServer, server_bindir
    from test_search import ENV, SNAKEFILE

    if server_bindir() is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    secret = "s3cret-pw-7f41"
    with PostgresServer() as pg:
        # The port comes from a variable too: unexpanded, the URL would not connect.
        url = "postgresql+psycopg://postgres:${PGPASSWORD}@127.0.0.1:${DMNSP_PG_PORT}/postgres"
        config = _search_config(tmp_path, url)
        env = {**ENV, "PGPASSWORD": secret, "DMNSP_PG_PORT": str(pg.port)}
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path)]
        cmd += ["results/tiny/search/study.json", "--cores", "1", "--configfile", str(config)]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        study = json.loads((tmp_path / "results" / "tiny" / "search" / "study.json").read_text())
        assert study["created"] is True and study["storage"] == url
        assert optuna.study.get_all_study_names(optuna.storages.RDBStorage(pg.url)) == [study["study_name"]]
        assert secret not in proc.stdout + proc.stderr
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
