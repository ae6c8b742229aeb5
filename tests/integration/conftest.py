"""Fixtures of the black-box tier."""
import hashlib
import os
import re
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from harness import Daemon, Postgres, destroy_pristine  # noqa: E402


@pytest.fixture(scope="session")
def pg():
    """One PostgreSQL for the tests that do not stop it."""
    p = Postgres(spares=True)
    yield p
    p.destroy()


def pytest_sessionfinish(session):
    """The stopped cluster the clusters of this process were copied from."""
    destroy_pristine()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """No test runs beside the work the session's clusters do between the
    tests (Postgres.between_tests): it ends first."""
    for p in list(Postgres.WITH_SPARES):
        p.before_test()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """The next test's database made while this one's daemons stop."""
    for p in list(Postgres.WITH_SPARES):
        p.between_tests()
    yield


@pytest.fixture(autouse=True)
def _databases_of_the_tests_before_dropped(request):
    """Each test that uses the session's PostgreSQL starts by dropping the
    databases of the tests before it on this worker (their daemons are
    stopped by then)."""
    if "pg" in request.fixturenames:
        request.getfixturevalue("pg").drop_made()


@pytest.fixture(scope="session")
def pg_planned():
    """A PostgreSQL that counts how often each statement is planned
    (Postgres.planned), for the tests of the daemon's prepared statements."""
    p = Postgres(count_planning=True)
    yield p
    p.destroy()


@pytest.fixture
def private_pg():
    """A PostgreSQL of the test's own, for tests that stop and start it."""
    p = Postgres()
    yield p
    p.destroy()


def database_name(prefix, node_name):
    """The database of a test, named after it, unique: a name longer than
    PostgreSQL's 63 bytes ends in a hash of the whole.  Until the sixtieth
    session the name was cut at 50 characters, so that the cases of one
    parametrized test with a long name had one database name, and the
    drop of one case's database, in a thread beside the next case's set-up
    (Postgres.drop_made), could drop the database the next case had just
    made under the same name (seen once in CI: "database ... does not
    exist" at a daemon's start)."""
    name = re.sub(r"[^a-z0-9_]", "_", node_name.lower())
    if len(name) > 50:
        name = name[:50] + "_" + hashlib.sha256(node_name.encode()).hexdigest()[:10]
    return prefix + name


@pytest.fixture
def db_url(pg, request):
    """A fresh database in the session cluster, named after the test."""
    return pg.new_database(database_name("t_", request.node.name))


@pytest.fixture
def empty_db_url(pg, request):
    """A fresh database without the schema: for the tests of the migrations
    (db_url's copy is migrated already)."""
    return pg.new_database(database_name("e_", request.node.name), migrated=False)


@pytest.fixture
def make_daemon(tmp_path, request):
    """Builds daemons that are stopped (and checked for a clean exit) at the end."""
    made = []
    request.node.causeway_daemons = made

    def make(db_url, **kw):
        # The daemons of one test share one signing key, as every process of
        # one database must (docs/operations.md): peers pin one key.
        opts = {k: dict(v) for k, v in (kw.pop("options", None) or {}).items()}
        opts.setdefault("peer", {}).setdefault("signing_key_file", str(tmp_path / "signing.key"))
        d = Daemon(db_url, str(tmp_path / f"d{len(made)}"), options=opts, **kw)
        made.append(d)
        return d

    yield make
    # every daemon told to stop first: they stop together, a test of three
    # daemons waited for three stops (some 0.3 s each, a sanitized
    # daemon's) one after the other
    stopping = [d for d in made if d.proc and d.proc.poll() is None]
    for d in stopping:
        d.proc.send_signal(signal.SIGTERM)
    unclean = []
    for d in made:
        if d in stopping:
            try:
                rc = d.stop(signalled=True)
            except subprocess.TimeoutExpired:  # killed by stop: the others still waited for
                rc = "nothing (killed, its stop not ended in time)"
            keep_log(d)
            if rc != 0:
                unclean.append(f"causewayd exited {rc} at teardown; log:\n{d.log()}")
        elif d.proc:
            keep_log(d)
    assert not unclean, unclean[0]


LOG_TAIL = 60


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the last lines of each of its
    daemons' logs: a wait never reached said nothing of what the daemon
    did, and the CI's machine keeps no pytest basetemp (keep_log)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed:
        return
    for i, d in enumerate(getattr(item, "causeway_daemons", ())):
        lines = d.log().splitlines()
        if lines:
            rep.sections.append((f"causewayd d{i}: the last {min(LOG_TAIL, len(lines))} of {len(lines)} log lines",
                                 "\n".join(lines[-LOG_TAIL:])))


def keep_log(d):
    """The daemon's log into its work directory (causewayd.log, under
    pytest's basetemp, which keeps the last three runs): a wait that was
    never reached says nothing of the daemon, whose log was kept in memory
    only."""
    try:
        with open(os.path.join(d.workdir, "causewayd.log"), "w") as f:
            f.write(d.log() + "\n")
    except OSError:
        pass


@pytest.fixture
def daemon(make_daemon, db_url):
    return make_daemon(db_url).start()
