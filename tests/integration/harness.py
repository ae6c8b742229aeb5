"""The black-box harness: a private PostgreSQL (tests/pg.sh) and the real
causewayd binary, started, read (its logfmt stderr) and stopped by tests."""
import atexit
import os
import math
import re
import select
import shlex
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import psycopg
import psycopg.pq as pq
import requests

TOP_SRCDIR = os.path.abspath(os.environ.get("top_srcdir") or
                             os.path.join(os.path.dirname(__file__), "..", ".."))
TOP_BUILDDIR = os.path.abspath(os.environ.get("top_builddir") or TOP_SRCDIR)
PG_SH = os.path.join(TOP_SRCDIR, "tests", "pg.sh")
CAUSEWAYD = os.path.join(TOP_BUILDDIR, "causewayd")
SCHEMA_DIR = os.path.join(TOP_SRCDIR, "schema")
# How many migrations this tree has (the daemon applies them all).
N_MIGRATIONS = len([f for f in os.listdir(SCHEMA_DIR) if f.endswith(".sql")])


import hashlib

# The admin token every test daemon is configured with (only its hash is in
# the daemon's configuration).
ADMIN_TOKEN = "cwa_test-admin-token"
ADMIN_HEADERS = {"Authorization": "Bearer " + ADMIN_TOKEN}


def _readable(fd, timeout):
    """Whether fd is readable within timeout seconds: poll, not select,
    which refuses a descriptor of 1024 or more."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(max(0, math.ceil(timeout * 1000))))


def self_signed_ca(directory, common_name, dns_names=(), ips=()):
    """A certificate of its own CA for a test's TLS server, valid an hour
    back and a day on, for the host names dns_names and the addresses ips:
    its PEM file and its key's, in directory, as (cert_file, key_file)."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = [x509.IPAddress(ipaddress.ip_address(a)) for a in ips] + [x509.DNSName(h) for h in dns_names]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file = os.path.join(str(directory), common_name.replace(" ", "-") + ".pem")
    key_file = os.path.join(str(directory), common_name.replace(" ", "-") + "-key.pem")
    with open(cert_file, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_file, key_file


def parse_logfmt(line):
    """key=value pairs of one logfmt record, with quoted values unescaped."""
    out = {}
    for m in re.finditer(r'(\w+)=("((?:[^"\\]|\\.)*)"|\S*)', line):
        key, raw, quoted = m.group(1), m.group(2), m.group(3)
        if quoted is not None:
            val = re.sub(r'\\(x[0-9a-f]{2}|.)',
                         lambda e: chr(int(e.group(1)[1:], 16)) if e.group(1).startswith("x")
                         else {"n": "\n", "t": "\t", "r": "\r"}.get(e.group(1), e.group(1)),
                         quoted)
        else:
            val = raw
        out[key] = val
    return out


class Postgres:
    """A throw-away cluster in its own directory under /tmp."""

    # The clusters whose database work goes on between tests (spares=True);
    # conftest's hooks start and end it (between_tests, before_test).
    WITH_SPARES = []

    def __init__(self, fast=True, count_planning=False, spares=False):
        """count_planning: pg_stat_statements on (planned), as the
        benchmarks' CAUSEWAY_PG_STATS has it.  spares: the session's
        cluster (conftest's pg), whose migrated databases are made while
        no test runs (between_tests)."""
        self.dir = tempfile.mkdtemp(prefix="causeway-pg-")
        self._sessions = _SqlSessions()
        self._made = []  # new_database's, to drop (drop_made)
        self._spare = None  # a copy of the migrated template, made ahead
        self._work = {}  # "spare", "drop": the threads making it, dropping
        self._work_errors = []
        if spares:
            Postgres.WITH_SPARES.append(self)
        os.chmod(self.dir, 0o755)  # the postgres user must reach it when we are root
        if fast:
            _pristine_copy(self.dir)
        self._run("init", *(["--fast"] if fast else []))  # a copy: started, not made again
        self.url = self._run("url").strip()
        self.stats_path = os.environ.get("CAUSEWAY_PG_STATS")
        if self.stats_path or count_planning:
            self._enable_stats(os.environ.get("CAUSEWAY_PG_EXPLAIN_MS"))

    def _enable_stats(self, explain_ms):
        """For profiling a benchmark: pg_stat_statements with planning times
        (a statement sent whole is planned on every call, and its planning
        is not in its execution time), and with explain_ms the plans of
        statements slower than that in the server log."""
        with open(os.path.join(self.dir, "data", "postgresql.conf"), "a") as f:
            f.write("shared_preload_libraries = 'pg_stat_statements, auto_explain'\n"
                    "pg_stat_statements.track = all\npg_stat_statements.track_planning = on\n")
            if explain_ms:
                f.write(f"auto_explain.log_min_duration = '{int(explain_ms)}ms'\nauto_explain.log_analyze = on\n"
                        "auto_explain.log_nested_statements = on\n")
        self.stop()
        self.start()
        self.psql("CREATE EXTENSION pg_stat_statements")

    def _dump_stats(self):
        out = self.psql("SELECT calls, plans, round(total_plan_time::numeric, 1), round(total_exec_time::numeric, 1), "
                        "left(regexp_replace(query, '\\s+', ' ', 'g'), 160) FROM pg_stat_statements "
                        "ORDER BY total_plan_time + total_exec_time DESC LIMIT 30")
        with open(self.stats_path, "a") as f:
            f.write("calls|plans|planning ms|running ms|statement\n" + out + "\n\n")
        shutil.copy(os.path.join(self.dir, "postgresql.log"), self.stats_path + ".log")

    def _run(self, *args):
        r = subprocess.run([PG_SH, args[0], self.dir, *args[1:]], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"pg.sh {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def stop(self, mode="fast"):
        self._sessions.close()  # a "smart" stop waits for every session
        self._run("stop", mode)

    def start(self):
        self._run("start")

    def psql(self, sql, db_url=None):
        """What `psql -qAtc sql` prints (rows a line each, columns joined by
        |, NULL empty, every statement's rows; stripped), or RuntimeError.
        The suite ran psql some thousands of times, most of them in polls
        (wait_until, ten a second): a psql process and a new server session
        each, up to a core of the two-core machine while a test waited.
        The main thread's SQL now goes over a session kept per database
        (_SqlSessions), whose state is reset after every text as psql's
        exit did."""
        return self._sessions.run(sql, db_url or self.url)

    def planned(self, db_url, prefix):
        """(calls, plans) of the statements run in db_url's database whose
        text starts with prefix, summed (pg_stat_statements: a cluster
        made with count_planning); each PostgreSQL session prepares its
        own, and a statement not prepared is planned at every call."""
        return self._statement_sums(db_url, prefix, "calls", "plans")

    def pages_read(self, db_url, prefix):
        """(calls, pages read: shared buffers hit or read) of the statements
        as planned() finds them."""
        return self._statement_sums(db_url, prefix, "calls", "shared_blks_hit + shared_blks_read")

    def _statement_sums(self, db_url, prefix, *columns):
        name = urllib.parse.urlparse(db_url).path.lstrip("/")
        sums = " || ' ' || ".join(f"coalesce(sum({c}), 0)" for c in columns)
        out = self.psql(f"SELECT {sums} FROM pg_stat_statements "
                        "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '%s') AND starts_with(query, '%s')"
                        % (name, prefix.replace("'", "''")))
        return tuple(int(x) for x in out.split())

    def new_database(self, name, migrated=True):
        """A fresh database in this cluster; returns its URL.  migrated: a
        copy of a database the daemon migrated once for the whole cluster
        (a daemon finds the schema current and applies nothing); else empty,
        for the tests of the migrations themselves.  Every test of the suite
        starting on an empty database applied all the migrations again, a
        second of a sanitized daemon's start each."""
        template = self._migrated_template() if migrated else "template0"
        self._end_work("spare")
        self.psql(f'DROP DATABASE IF EXISTS "{name}"')
        made = False
        if migrated and self._spare:
            # the copy made ahead, renamed: what CREATE DATABASE would have
            # made then (a database nothing has connected to)
            spare, self._spare = self._spare, None
            try:
                self._sessions.run_alone(f'ALTER DATABASE "{spare}" RENAME TO "{name}"', self.url)
                made = True
            except RuntimeError as ex:
                print(f"pg: {spare} not renamed to {name}: {ex}", file=sys.stderr)
                self._made.append(spare)  # dropped with the test's
        if not made:
            self.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        self._made.append(name)
        return self._url_of(name)

    def between_tests(self):
        """After a test's call, before its teardown (conftest): the next
        test's migrated database is made meanwhile, in a thread.  A
        CREATE DATABASE from the 10 MB template took 0.1 to 0.9 s of every
        test's setup (two workers and their daemons on two cores), and the
        previous test's DROP 0.03 to 0.2 s more."""
        if not getattr(self, "_template_made", False) or self._spare or "spare" in self._work:
            return
        name = f"cw_spare_{os.getpid()}"
        self._start_work("spare", lambda: self._make_spare(name))

    def _make_spare(self, name):
        # a spare of an earlier run of this worker's pid cannot be here: the
        # cluster is the session's own
        self._sessions.run(f'CREATE DATABASE "{name}" TEMPLATE "cw_migrated"', self.url)
        self._spare = name

    def before_test(self):
        """Before a test's call (conftest): the work between the tests has
        ended, so a test never runs beside it (a CREATE DATABASE holds
        locks on the template's relations, whose oids are the test's)."""
        self._end_work()

    def _start_work(self, what, fn):
        def run():
            try:
                fn()
            except Exception as ex:  # reported when ended; the test then makes its own
                self._work_errors.append(ex)
        self._work[what] = threading.Thread(target=run, daemon=True)
        self._work[what].start()

    def _end_work(self, *which):
        for what in which or list(self._work):
            t = self._work.pop(what, None)
            if t:
                t.join(self._sessions.TIMEOUT_S * 2)
        while self._work_errors:
            print(f"pg: work between the tests failed: {self._work_errors.pop(0)}", file=sys.stderr)

    def drop_made(self):
        """Drops the databases new_database made (conftest: those of the
        tests before; WITH (FORCE): a process a test left behind).  They
        were kept to the end of the run, some 400 copies of 10 MB a worker,
        and removing the cluster's directory took 20 to 90 s of the run's
        last test."""
        if not self._made:
            return
        self._end_work("drop")
        names, self._made = self._made[::-1], []
        # the main thread's sessions to them ended first (the FORCE would)
        self._sessions.forget([self._url_of(n) for n in names])

        def drop():
            for name in names:
                try:
                    self._sessions.run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', self.url)
                except RuntimeError as ex:
                    print(f"pg: {name} not dropped: {ex}", file=sys.stderr)
        if self in Postgres.WITH_SPARES:
            # in a thread, beside the test's setup (before_test waits for it)
            self._start_work("drop", drop)
        else:
            drop()

    def _url_of(self, name):
        return self.url.replace("postgresql:///causeway?", f"postgresql:///{name}?")

    def _migrated_template(self):
        name = "cw_migrated"
        if getattr(self, "_template_made", False):
            return name
        self.psql(f'DROP DATABASE IF EXISTS "{name}"')
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
        r = run_causewayd(["--migrate"], env={"CAUSEWAY_DATABASE_URL": self._url_of(name),
                                              "CAUSEWAY_DATABASE_SCHEMA_DIR": SCHEMA_DIR})
        if r.returncode != 0:
            raise RuntimeError(f"causewayd --migrate of the template database failed:\n{r.stderr}")
        self._template_made = True
        return name

    def destroy(self):
        self._end_work()
        if self in Postgres.WITH_SPARES:
            Postgres.WITH_SPARES.remove(self)
        self._sessions.close()
        if self.stats_path:
            try:
                self._dump_stats()
            except (RuntimeError, OSError) as ex:
                print(f"pg stats: {ex}", file=sys.stderr)
        subprocess.run([PG_SH, "destroy", self.dir], capture_output=True, timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)


_PRISTINE = []  # this process's stopped cluster, as `pg.sh init --fast` made it


def _pristine_copy(directory):
    """A copy into directory of a cluster `pg.sh init --fast` made once for
    this process and stopped, its socket directory made directory's own;
    pg.sh init then only starts it.  initdb took 3 to 12 s of every test
    of its own cluster (private_pg, some 40 of them) and of every worker's
    two session clusters, on the loaded two cores; a copy of the 40 MB
    data directory takes a fraction of a second."""
    if not _PRISTINE:
        src = tempfile.mkdtemp(prefix="causeway-pg-")
        os.chmod(src, 0o755)
        for args in (["init", src, "--fast"], ["stop", src]):
            r = subprocess.run([PG_SH, *args], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"pg.sh {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
        if os.path.exists(os.path.join(src, "sockdir")):  # a socket elsewhere: not copied
            subprocess.run([PG_SH, "destroy", src], capture_output=True, timeout=120)
            _PRISTINE.append(None)
        else:
            _PRISTINE.append(src)
            atexit.register(destroy_pristine)
    src = _PRISTINE[0]
    if src is None or len(directory) + 5 + 14 > 107:
        return
    subprocess.run(["cp", "-a", os.path.join(src, "data"), os.path.join(src, ".causeway-pg"), directory],
                   check=True, timeout=120)
    conf = os.path.join(directory, "data", "postgresql.conf")
    with open(conf) as f:
        text = f.read()
    old = "unix_socket_directories = '%s'" % os.path.join(src, "sock").replace("'", "''")
    assert old in text, f"no {old} in the copied {conf}"
    with open(conf, "w") as f:
        f.write(text.replace(old, "unix_socket_directories = '%s'" % os.path.join(directory, "sock").replace("'", "''")))


def destroy_pristine():
    """The process's stopped cluster removed (conftest, at the session's
    end: an xdist worker may end without its atexit handlers)."""
    while _PRISTINE:
        src = _PRISTINE.pop()
        if src:
            subprocess.run([PG_SH, "destroy", src], capture_output=True, timeout=120)


class _SessionLost(RuntimeError):
    """The server ended the session before the text's first answer."""


class _Kept:
    """A kept session (its PGconn's attributes), and whether it was used
    before (kept: a lost one is opened again once)."""

    def __init__(self, conn):
        self.conn, self.kept = conn, False

    def __getattr__(self, name):
        return getattr(self.conn, name)


class _SqlSessions:
    """Kept libpq sessions (psycopg's libpq layer: the server's text of
    every value, as psql prints it), a few databases at a time, for
    Postgres.psql.  A text runs as psql -c runs it: one simple query, in
    one implicit transaction, every statement's rows.  After it, the
    session is put back as a new one would be (a transaction left open is
    rolled back, its statistics flushed, then DISCARD ALL: settings,
    session advisory locks, temporary tables, LISTEN), so a test sees no
    difference but the time.
    A session the server ended (a restart, pg_terminate_backend) is found
    ended before it is used (its socket readable while idle) and opened
    again.  Other threads (a test's writer thread, blocked on a lock the
    main thread's SQL then looks at) get a session of their own for each
    text, ended after it, as psql's was."""

    KEEP = 3  # the cluster's own database, the test's, one more
    TIMEOUT_S = 60  # psql's subprocess timeout before
    DATABASE_DDL = re.compile(r"\b(CREATE|DROP|ALTER)\s+DATABASE\b", re.I)
    # what a new session would start with changed (ALTER DATABASE ... SET
    # timezone, say): a kept session keeps what it started with
    NEW_SESSION_DEFAULTS = re.compile(r"\bALTER\s+(DATABASE|ROLE|USER|SYSTEM)\b|\bpg_reload_conf\b", re.I)

    def __init__(self):
        self._kept = {}  # url -> PGconn, oldest first

    def close(self):
        for conn in self._kept.values():
            conn.finish()
        self._kept.clear()

    def forget(self, urls):
        """The kept sessions to urls ended (their databases to be dropped)."""
        for u in urls:
            conn = self._kept.pop(u, None)
            if conn is not None:
                conn.finish()

    def run_alone(self, sql, url):
        """sql on a session of its own, ended after it (as other threads'
        are): kept sessions stay as they were."""
        conn = self._connect(url)
        try:
            return self._run(conn, sql)
        finally:
            conn.finish()

    def run(self, sql, url):
        main = threading.current_thread() is threading.main_thread()
        if main and self.DATABASE_DDL.search(sql):
            # CREATE DATABASE ... TEMPLATE and DROP DATABASE refuse a
            # database another session is connected to
            for u in [u for u in self._kept if u != url]:
                self._kept.pop(u).finish()
        conn = self._session(url) if main else self._connect(url)
        try:
            try:
                return self._run(conn, sql)
            except _SessionLost:
                if not main or not conn.kept:
                    raise
                # a kept session the server ended a moment ago (a
                # terminate's signal on its way when it looked alive):
                # the text went nowhere, as it would have with psql
                self._kept.pop(url, None)
                conn.finish()
                conn = self._session(url)
                return self._run(conn, sql)
        finally:
            if not main:
                conn.finish()
            elif self.NEW_SESSION_DEFAULTS.search(sql):
                self.close()
            elif not self._reset(conn):
                self._kept.pop(url, None)
                conn.finish()

    def _connect(self, url):
        conn = pq.PGconn.connect(url.encode())
        if conn.status != pq.ConnStatus.OK:
            msg = conn.error_message.decode(errors="replace")
            conn.finish()
            raise RuntimeError(f"psql failed: {msg}")
        return conn

    def _session(self, url):
        conn = self._kept.pop(url, None)
        if conn is not None and not self._alive(conn):
            conn.finish()
            conn = None
        if conn is None:
            conn = _Kept(self._connect(url))
        else:
            conn.kept = True
        self._kept[url] = conn  # the newest last
        while len(self._kept) > self.KEEP:
            self._kept.pop(next(iter(self._kept))).finish()
        return conn

    @staticmethod
    def _alive(conn):
        """False when the server ended the idle session (its last message,
        or the end of the stream, is waiting to be read)."""
        try:
            if conn.status != pq.ConnStatus.OK:
                return False
            if _readable(conn.socket, 0):
                conn.consume_input()
            return conn.status == pq.ConnStatus.OK and not conn.is_busy()
        except (psycopg.OperationalError, OSError):
            return False

    def _result(self, conn, deadline):
        while True:
            conn.consume_input()
            if not conn.is_busy():
                return conn.get_result()
            left = deadline - time.monotonic()
            if left <= 0 or not _readable(conn.socket, left):
                raise RuntimeError(f"psql failed: no answer in {self.TIMEOUT_S} s")

    def _run(self, conn, sql):
        deadline = time.monotonic() + self.TIMEOUT_S
        rows, error = [], None
        try:
            conn.send_query(sql.encode())
            while (r := self._result(conn, deadline)) is not None:
                if r.status == pq.ExecStatus.TUPLES_OK:
                    rows += ["|".join("" if v is None else v.decode() for v in
                                      (r.get_value(i, j) for j in range(r.nfields))) for i in range(r.ntuples)]
                elif r.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.EMPTY_QUERY):
                    error = error or r.error_message.decode(errors="replace") or str(r.status)
        except psycopg.OperationalError as ex:
            if not rows and conn.status != pq.ConnStatus.OK:
                raise _SessionLost(f"psql failed: {ex}") from ex
            error = str(ex)
        if error:
            raise RuntimeError(f"psql failed: {error}")
        return "\n".join(rows).strip()

    def _reset(self, conn):
        """The session as a new one (True), or False to end it."""
        try:
            if conn.status != pq.ConnStatus.OK or conn.is_busy():
                return False
            if conn.transaction_status != pq.TransactionStatus.IDLE:
                if conn.exec_(b"ROLLBACK").status != pq.ExecStatus.COMMAND_OK:
                    return False
            # the text's counts in the server's statistics now, as at
            # psql's exit (a test reads them: idx_scan, say), not up to
            # ten seconds later
            if conn.exec_(b"SELECT pg_stat_force_next_flush()").status != pq.ExecStatus.TUPLES_OK:
                return False
            return conn.exec_(b"DISCARD ALL").status == pq.ExecStatus.COMMAND_OK
        except psycopg.OperationalError:
            return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """The real causewayd with a configuration file of its own."""

    def __init__(self, db_url, workdir, options=None, env=None, schema_dir=SCHEMA_DIR, wrapper=None,
                 ready_timeout=30, product_sweep=False):
        """product_sweep: the policy's periodic sweep at the product's own
        cadence (policy.sweep_interval_ms not written: its default, 2000),
        as a benchmark measuring a production server's CPU needs; the tests
        sweep every 200 ms, so that what a sweep decides is seen soon.  At
        the tests' cadence the sweeps were more than a quarter of
        PostgreSQL's CPU a message of tests/bench/xmpp's release
        (docs/performance.md, "Fifty-fifth session: where PostgreSQL's CPU
        on the XMPP release goes")."""
        self.workdir = workdir
        self.wrapper = list(wrapper or [])  # e.g. valgrind and its options
        self.ready_timeout = ready_timeout
        os.makedirs(workdir, exist_ok=True)
        self.config_path = os.path.join(workdir, "causeway.ini")
        self.options = {
            "server": {"listen_address": "127.0.0.1", "port": "0", "drain_timeout_ms": "5000",
                       "domain": "example.org"},
            "peer": {"signing_key_file": os.path.join(workdir, "signing.key")},
            "dispatcher": {"retry_base_ms": "100", "retry_max_ms": "1000"},
            "database": {"url": db_url, "schema_dir": schema_dir, "startup_timeout_ms": "2000",
                         "reconnect_max_ms": "500"},
            "log": {"level": "info"},
            "policy": {} if product_sweep else {"sweep_interval_ms": "200"},
            "admin": {"token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()},
        }
        for section, values in (options or {}).items():
            self.options.setdefault(section, {}).update(values)
        self.write_config()
        self.env = dict(os.environ)
        for k in list(self.env):
            if k.startswith("CAUSEWAY_"):
                del self.env[k]
        self.env.update(env or {})
        self.proc = None
        self._reader = None
        self.run_start = 0
        self.lines = []
        self.records = []
        self._cond = threading.Condition()
        self.port = None

    def write_config(self):
        # 0600 whatever the umask: a file every user may write is refused
        # (since the forty-fourth session), one they may read is warned of
        with open(os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            for section, values in self.options.items():
                f.write(f"[{section}]\n")
                for k, v in values.items():
                    f.write(f"{k} = {v}\n")

    def start(self, wait_ready=True, args=None):
        """The daemon spawned, and with wait_ready its "ready" record
        awaited: the one this process writes (self.run_start, the index of
        its first record in self.records, which keeps every run's).  Until
        the sixtieth session the wait read from record 0, so a daemon
        restarted (its port 0: the kernel's choice, another each run) took
        the previous run's "ready", its port, and went on before the new
        process listened: a test's next request was refused, or reached
        nothing; the tests that restarted one each looked past the old
        records themselves (start=seen), and the others were racy."""
        if self.proc and self._reader and self.proc.poll() is not None:
            self._reader.join(timeout=5)  # the last run's lines all in before the mark
        with self._cond:
            self.run_start = len(self.records)
        cmd = self.wrapper + [CAUSEWAYD, "--config", self.config_path] + list(args or [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=self.env, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_ready:
            rec = self.wait_for(lambda r: r.get("msg") == "ready", timeout=self.ready_timeout,
                                start=self.run_start)
            self.port = int(rec["port"])
        return self

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self.records.append(parse_logfmt(line))
                self._cond.notify_all()

    def wait_for(self, pred, timeout=10, start=0):
        """The first log record from index start on that satisfies pred."""
        deadline = time.time() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.records):
                    if pred(self.records[i]):
                        return self.records[i]
                    i += 1
                left = deadline - time.time()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no such log record in {timeout}s; " + self.log_tail())
                self._cond.wait(min(left, 0.2))

    def log(self):
        with self._cond:
            return "\n".join(self.lines)

    def log_tail(self, n=150):
        """The log's last n lines, for an assertion's message: the whole
        log is the test directory's causewayd.log (conftest.keep_log), and
        a message of thousands of lines buried the CI's report."""
        with self._cond:
            lines = self.lines[-n:]
            skipped = len(self.lines) - len(lines)
        return (f"log (the last {len(lines)} lines, {skipped} before them in causewayd.log):\n" if skipped
                else "log:\n") + "\n".join(lines)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def get(self, path, **kw):
        kw.setdefault("timeout", 10)
        return requests.get(self.url + path, **kw)

    def request(self, method, path, **kw):
        kw.setdefault("timeout", 10)
        return requests.request(method, self.url + path, **kw)

    def admin(self, method, path, **kw):
        """A call to /admin/v1 with the admin token."""
        headers = dict(ADMIN_HEADERS)
        headers.update(kw.pop("headers", {}))
        return self.request(method, "/admin/v1" + path, headers=headers, **kw)

    def cpu_seconds(self):
        """The daemon's user + system CPU time from its /metrics (getrusage:
        microseconds, where /proc/PID/stat counts 10 ms ticks, too coarse for
        a few thousand messages)."""
        text = self.get("/metrics").text
        m = re.search(r"^process_cpu_seconds_total (\S+)$", text, re.M)
        if not m:
            raise RuntimeError("no process_cpu_seconds_total in /metrics")
        return float(m.group(1))

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout=30):
        deadline = time.monotonic() + timeout
        if self.proc.returncode is None:
            self._exited(timeout)
        rc = self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        self._log_read()
        return rc

    def _log_read(self):
        """The log read to its end (the reader thread joined), then its pipe
        closed: kept open, each daemon held a descriptor until the worker
        ended (the Daemon lives on in its test's item), over a thousand in a
        long worker."""
        self._reader.join(timeout=5)
        if not self._reader.is_alive() and self.proc.stdout and not self.proc.stdout.closed:
            self.proc.stdout.close()

    def _exited(self, timeout):
        """Returns when the process has exited (its pidfd readable), or
        after timeout.  Popen.wait(timeout) polls, its sleeps growing to
        50 ms: 25 ms on average after every daemon's exit, at the end of
        nearly every test.  The process is not reaped yet (returncode None),
        so its pid is still its own."""
        try:
            fd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):  # not Linux 5.3, Python 3.9: Popen.wait's polling
            return
        try:
            _readable(fd, timeout)
        finally:
            os.close(fd)

    def stop(self, signalled=False):
        """SIGTERM and wait; returns the exit code.  signalled: the SIGTERM
        was sent already (conftest's make_daemon: a test's daemons stop
        together), not to be sent twice."""
        if self.proc and self.proc.poll() is None:
            if not signalled:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.wait_exit(30 + (90 if self.wrapper else 0))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        if self.proc and self._reader:
            # exited already (a test's daemons are told to stop together):
            # its last lines (an AddressSanitizer's report) read all the same
            self._log_read()
        return self.proc.returncode if self.proc else None


def run_causewayd(args, env=None, timeout=60):
    e = {k: v for k, v in os.environ.items() if not k.startswith("CAUSEWAY_")}
    e.update(env or {})
    return subprocess.run([CAUSEWAYD] + list(args), capture_output=True, text=True, env=e,
                          timeout=timeout)


class HeldSession:
    """A psql session of its own (another process's transaction), fed
    statements one at a time; each waits for its answer."""

    def __init__(self, db_url):
        self.proc = subprocess.Popen(["psql", db_url, "-qAt", "-v", "ON_ERROR_STOP=1"], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, sql):
        self.proc.stdin.write(sql + "\n\\echo done\n")
        self.proc.stdin.flush()
        while self.proc.stdout.readline().strip() != "done":
            assert self.proc.poll() is None, "psql ended: " + sql

    def end(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("COMMIT;\n")
            self.proc.stdin.close()  # psql ends its session
            self.proc.wait(30)


# A peer's name for its user (for wally of peer gk) and how a local
# network shows it before its "(gk)": a Matrix ghost's display name, an
# XMPP contact's vCard (cw_utf8_name_shown).
NAMES_SHOWN = [
    ("alice" + "\u3164" * 80, "alice"),             # Hangul fillers: blanks that are no spaces
    ("Causeway bot\u2067", "Causeway bot"),         # an isolate that never ends: "(gk)" shown reversed
    ("al\u200bi\u2800ce\ufeff\u202e", "alice"),     # zero-width, Braille's blank, BOM, an override
    ("  Wally \u00a0 \u2003Wonka\u3000 ", "Wally Wonka"),  # blanks of any kind one space, none around
    ("\u115f\u1160\u200d", "wally"),                # nothing visible: the local part
    ("x" * 100, "x" * 63 + "\u2026"),                # the name part capped, "(gk)" in sight
]


def thread_names(pid, exiting=False):
    """The names of process pid's threads (/proc/PID/task/*/stat), a
    thread that has begun its exit (PF_EXITING in its stat's flags: a
    joined thread may still be listed a moment) left out unless exiting;
    a thread gone between the listing and its read left out.  OSError
    when the process is gone.  Until the sixty-first session
    test_matrix_media.py's ThreadWatch, test_faults.py's probe_threads and
    leak_cycles.py's snap each listed the threads their own way."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if exiting or not int(rest[6]) & 0x4:  # rest[0] is the state (field 3), rest[6] the flags (9)
            names.append(name)
    return names


def wait_until(fn, timeout=15, interval=0.1, what="condition"):
    """fn()'s first true value, polled every interval; the first polls
    sooner (10 ms, doubled up to interval): most conditions (a delivery, a
    row written) hold some tens of milliseconds in, and at a fixed 100 ms
    a wait took 50 ms more than its condition on average, about once a
    test."""
    deadline = time.time() + timeout
    last = None
    pause = min(0.01, interval)
    while time.time() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as ex:  # a refused connection while starting, say
            last = ex
        time.sleep(pause)
        pause = min(pause * 2, interval)
    raise AssertionError(f"{what} not reached in {timeout}s (last: {last!r})")


def delivered_to_her(daemon, peer, pg, db_url, room, local, sender="wally"):
    """local accepts the peer's user sender (the admin API), and his
    message in room is delivered to her by the local adapter: from then on
    the peer knows her there, and her block of him travels there
    (docs/policy.md, "Blocks travel")."""
    assert daemon.admin("POST", "/consents", json={"user": local, "subject_kind": "user",
                                                   "subject": peer.user(sender), "state": "allowed"}).ok
    msg = peer.send(room, peer.user(sender), "hello").json()["id"]
    wait_until(lambda: outbox_state_of(pg, db_url, msg) == "delivered", what=f"{sender}'s message delivered")


def outbox_state_of(pg, db_url, msg):
    return pg.psql("SELECT o.state FROM outbox o JOIN events e ON e.id = o.event_id "
                   f"WHERE e.public_id = '{msg}'", db_url)


__all__ = ["ADMIN_TOKEN", "ADMIN_HEADERS", "Postgres", "Daemon", "run_causewayd", "wait_until", "parse_logfmt", "free_port",
           "TOP_SRCDIR", "TOP_BUILDDIR", "SCHEMA_DIR", "CAUSEWAYD", "shlex"]


# Times a test bounds, on the daemon's clock.  With four test workers on
# two cores (CAUSEWAY_TEST_JOBS=4) a test's own clock around an HTTP call
# counted its Python's wait for a processor, and the connection's wait to
# be read, as much as the daemon's answer: bounds such as "503 by the 1 s
# deadline" failed on the test's overhead, not on the daemon's.
def served_record(daemon, answer, timeout=10):
    """daemon's access log record of the request of answer (a requests
    response, or a dict of lower-cased headers), matched by its
    X-Request-Id: its time is the answer's sending, its duration_ms the
    time from the request line read to then."""
    headers = answer if isinstance(answer, dict) else {k.lower(): v for k, v in answer.headers.items()}
    rid = headers["x-request-id"]
    return daemon.wait_for(lambda r: r.get("msg") == "request" and r.get("request_id") == rid, timeout=timeout)


def served_in(daemon, answer, timeout=10):
    """The seconds daemon took over the request of answer, on its own
    clock (served_record's duration_ms)."""
    return float(served_record(daemon, answer, timeout)["duration_ms"]) / 1000


def answered_at(daemon, answer, timeout=10):
    """When daemon sent its answer to the request of answer, on its own
    clock (served_record's time, as time.time() counts)."""
    return logged_at(served_record(daemon, answer, timeout))


def logged_at(rec):
    """A log record's ts (UTC, to the millisecond) as time.time() counts."""
    import datetime
    return datetime.datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ") \
        .replace(tzinfo=datetime.timezone.utc).timestamp()


def stopped_in(daemon, timeout=10):
    """The seconds daemon's stop took on its own clock: its "stopped"
    record's shutdown_ms, from the stop signal read to the stop done (the
    process's exit after it, under the sanitizers a loaded machine's
    second or more, not counted)."""
    rec = daemon.wait_for(lambda r: r.get("msg") == "stopped", timeout=timeout)
    return float(rec["shutdown_ms"]) / 1000
