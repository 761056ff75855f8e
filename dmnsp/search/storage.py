"""Where a search's trials live: a journal file or an SQL database, both with heartbeats of running
trials so that a killed worker's trial is failed and retried; creating and loading the study."""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from .spec import SearchError

#: States that count towards the trial budget.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Trial system attribute holding the last heartbeat (seconds since the epoch) in a journal file.
HEARTBEAT_ATTR = "dmnsp:heartbeat"


# ------------------------------------------------------------------------------------- storage


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Journal storage whose running trials record heartbeats, like ``RDBStorage(heartbeat_interval=...)``.

    A heartbeat is a trial system attribute (:data:`HEARTBEAT_ATTR`) rewritten every
    ``heartbeat_interval`` seconds by Optuna's heartbeat thread. A RUNNING trial whose last
    heartbeat (and start) lie more than ``grace_period`` seconds back is stale: Optuna's
    ``fail_stale_trials``, which ``study.optimize`` calls before every trial, marks it FAIL and runs
    ``heartbeat_stale_trial_callback`` (a retry). Clocks of machines sharing the file must agree.
    """

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_interval: int,
        grace_period: int | None = None,
        heartbeat_stale_trial_callback: Callable | None = None,
    ) -> None:
        super().__init__(backend)
        self._heartbeat_interval = int(heartbeat_interval)
        self._grace_period = int(grace_period) if grace_period else 2 * self._heartbeat_interval
        self._stale_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            if self.get_trial(trial_id).state == TrialState.RUNNING:
                self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
            pass  # finished (or failed by another worker) meanwhile: nothing to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            if beat is None:
                continue  # never beaten: not started under a heartbeat (as RDBStorage)
            started = trial.datetime_start.timestamp() if trial.datetime_start else beat
            # A retried trial inherits its predecessor's attributes: its own start counts too.
            if now - max(float(beat), started) > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return self._stale_callback


def is_url(storage: str) -> bool:
    """True for an SQLAlchemy URL (``postgresql+psycopg://...``), False for a journal file path."""
    head, sep, _ = storage.partition("://")
    return bool(sep) and head.replace("+", "").replace("_", "").isalnum()


#: Seconds a storage check waits for a database server (TCP connect, then the driver's own
#: connection with its handshake) before it gives up naming the server.
CONNECT_TIMEOUT = 10.0
#: Default ports of the network databases SQLAlchemy knows, for the TCP probe.
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_URL_EXAMPLE = "postgresql+psycopg://user:${PGPASSWORD}@host:5432/db, or a journal file path"


def storage_target(storage: str) -> str:
    """``storage`` with its ``$VAR`` / ``${VAR}`` taken from the environment; an unset variable is a
    :class:`SearchError` naming it (never used literally: not as a folder name, not as a password)."""
    unset = sorted({a or b for a, b in _VARIABLE.findall(storage)} - set(os.environ))
    if unset:
        shown = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", storage)  # never print a password
        raise SearchError(
            f"search.storage {shown!r} uses the unset environment variable(s) {', '.join(unset)}; "
            f"export {unset[0]}=... before running (or write the value into the URL)"
        )
    return os.path.expandvars(storage)


def _connect_args(url: Any) -> dict[str, Any]:
    """Driver arguments that bound the time a connection may take."""
    if url.get_backend_name() in ("postgresql", "mysql", "mariadb"):
        return {"connect_timeout": max(1, round(CONNECT_TIMEOUT))}
    return {}


def _probe(host: str, port: int, shown: str) -> None:
    """A TCP connection to the database server, with a timeout: names an unknown host, a closed port
    or a server that does not answer before the driver gets to hang on it."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return
    except socket.gaierror as exc:
        why = f"the host {host!r} is unknown ({exc.strerror}); check the host name"
    except ConnectionRefusedError:
        why = f"nothing listens on {host}:{port} (connection refused); start the database server or fix the port"
    except TimeoutError:
        why = f"{host}:{port} did not answer within {CONNECT_TIMEOUT:g} s; check the server, the network or a firewall"
    except OSError as exc:
        why = f"{host}:{port} cannot be reached ({exc.strerror or exc}); check the host and port"
    raise SearchError(f"search.storage {shown}: {why}")


def _check_url(target: str, raw: str) -> None:
    """Parse, load the driver and connect once (with :data:`CONNECT_TIMEOUT`); one line per problem."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        url = make_url(target)
    except (ValueError, sqlalchemy.exc.ArgumentError) as exc:
        raise SearchError(
            f"search.storage {raw!r} is not a database URL ({exc}); give e.g. {_URL_EXAMPLE}"
        ) from None
    shown = url.render_as_string(hide_password=True)
    try:
        url.get_dialect().import_dbapi()
    except sqlalchemy.exc.NoSuchModuleError:
        raise SearchError(
            f"search.storage {shown}: SQLAlchemy knows no database {url.drivername!r}; give e.g. {_URL_EXAMPLE}"
        ) from None
    except ImportError as exc:
        raise SearchError(
            f"search.storage {shown}: the database driver {url.get_driver_name()!r} is not installed ({exc}); "
            f"pip install it, or use another driver in the URL"
        ) from None
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            _make_folder(Path(database).parent, shown)
    elif url.host and not url.host.startswith("/"):
        _probe(url.host, url.port or _DEFAULT_PORTS.get(url.get_backend_name(), 0), shown)
    engine = sqlalchemy.create_engine(
        url, connect_args=_connect_args(url), poolclass=sqlalchemy.pool.NullPool
    )
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise SearchError(
            f"search.storage {shown}: cannot connect ({first}); check the URL and the server"
        ) from None
    finally:
        engine.dispose()


def _make_folder(folder: Path, shown: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SearchError(
            f"search.storage {shown}: cannot create the folder {folder} ({exc.strerror}); choose a writable path"
        ) from None


def _check_journal(path: Path) -> None:
    if path.is_symlink():  # a planted link would have every worker append trials to its target
        raise SearchError(
            f"search.storage {path} is a symbolic link; give the journal file's own path (dmnsp never "
            "writes a journal through a link)"
        )
    if path.is_dir():
        raise SearchError(
            f"search.storage {path} is a folder; give the journal file's path, e.g. {path / 'study.journal'}"
        )
    if path.exists() and not path.is_file():  # opening a FIFO would block every worker forever
        raise SearchError(
            f"search.storage {path} is not a regular file (a FIFO, socket or device); give the path of "
            "a journal file (created when missing)"
        )
    _make_folder(path.parent, str(path))
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        os.close(os.open(path, flags, 0o666))
    except OSError as exc:
        raise SearchError(
            f"search.storage {path}: cannot write the journal ({exc.strerror}); choose a writable path"
        ) from None


def check_storage(spec: Mapping[str, Any]) -> str:
    """Check the study's storage once, before any worker starts: unset variables, a URL that does not
    parse, a missing driver, an unknown host, a closed port, a server that does not answer within
    :data:`CONNECT_TIMEOUT` seconds, a journal path that is a folder or cannot be written. Each is a
    one-line :class:`SearchError` (a password in the URL is shown as ``***``).

    Returns:
        The storage with its variables expanded.
    """
    raw = str(spec["storage"])
    target = storage_target(raw)
    if is_url(target):
        _check_url(target, raw)
    else:
        _check_journal(Path(target))
    return target


def open_storage(spec: Mapping[str, Any], retry: bool = True) -> optuna.storages.BaseStorage:
    """The study's storage, with heartbeats and retries of stale trials, checked first
    (:func:`check_storage`: one connection with a timeout, a one-line error for each problem).

    ``spec["storage"]`` is a journal file path (created with its folder) or an SQLAlchemy URL;
    ``$VARS`` in it are expanded from the environment here, so a password need not be written into
    the config (``postgresql+psycopg://user:${PGPASSWORD}@host/db``); an unset one is an error.

    Args:
        spec: the search spec (``storage``, ``heartbeat_interval``, ``grace_period``, ``max_retry``).
        retry: re-enqueue stale trials (False for read-only uses such as the export).
    """
    target = check_storage(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = RetryHeartbeatStaleTrialCallback(max_retry=spec["max_retry"]) if retry else None
    kwargs = {"heartbeat_interval": spec["heartbeat_interval"], "grace_period": spec["grace_period"]}
    if is_url(target):
        from sqlalchemy.engine import make_url

        engine: dict[str, Any] = {"connect_args": _connect_args(make_url(target))}
        if not target.startswith("sqlite"):
            engine["pool_pre_ping"] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                target, engine_kwargs=engine, heartbeat_stale_trial_callback=callback, **kwargs
            )
    return HeartbeatJournalStorage(
        JournalFileBackend(str(Path(target))), heartbeat_stale_trial_callback=callback, **kwargs
    )


def _sampler(spec: Mapping[str, Any], worker: int) -> optuna.samplers.BaseSampler:
    """The sampler of one worker: seeded with ``seed + worker`` so workers do not draw alike."""
    cfg = spec["sampler"]
    seed = int(cfg["seed"]) + int(worker)
    if cfg["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    kwargs = {} if cfg["n_startup_trials"] is None else {"n_startup_trials": int(cfg["n_startup_trials"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, **kwargs)


def _pruner(spec: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    cfg = spec["pruner"]
    if cfg["name"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=int(cfg["n_startup_trials"]), n_warmup_steps=int(cfg["n_warmup_steps"])
    )


def retry_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial that ``trial`` re-runs after its worker died (None for a fresh trial)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards the budget (complete or pruned)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# ------------------------------------------------------------------------------------- study


def create_study(spec: Mapping[str, Any]) -> dict:
    """Create the study, or load it when it exists (a re-run resumes; trials are kept).

    Returns:
        ``{"study_name", "storage", "existing_trials", "created"}`` for ``study.json``.
    """
    storage = open_storage(spec, retry=False)
    created = spec["study_name"] not in optuna.study.get_all_study_names(storage)
    study = optuna.create_study(
        study_name=spec["study_name"], storage=storage, direction=spec["direction"], load_if_exists=True
    )
    old_space = study.user_attrs.get("space")
    if old_space is not None and old_space != spec["space"]:
        print(f"note: the search space differs from the one the study started with: {old_space}", flush=True)
    study.set_user_attr("space", spec["space"])
    study.set_user_attr("objective", spec["objective"])
    study.set_user_attr("experiment", spec["experiment"])
    study.set_user_attr("n_trials", spec["n_trials"])
    return {
        "study_name": spec["study_name"],
        "storage": str(spec["storage"]),
        "existing_trials": len(study.trials),
        "created": created,
    }


def load_study(spec: Mapping[str, Any], worker: int = 0, retry: bool = True) -> optuna.Study:
    """The existing study with this worker's sampler and the pruner."""
    try:
        return optuna.load_study(
            study_name=spec["study_name"],
            storage=open_storage(spec, retry=retry),
            sampler=_sampler(spec, worker),
            pruner=_pruner(spec),
        )
    except KeyError:
        raise SearchError(
            f"no study {spec['study_name']!r} in {spec['storage']}; run `dmnsp search-create` first"
        ) from None
