"""Configuration from the outside: --check-config, the environment, and the
documentation kept in step with the option table."""
import glob
import os
import re
import shutil
import signal

from harness import SCHEMA_DIR, TOP_SRCDIR, run_causewayd


def options():
    r = run_causewayd(["--list-options"])
    assert r.returncode == 0
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert all(len(row) == 7 for row in rows)
    return {row[0]: row for row in rows}


def key_env(tmp_path, **more):
    """The key file in tmp_path: --check-config refuses a missing key file in a
    directory that is not there (the default's, /usr/local/var/lib/causeway,
    on a machine without an install), since the thirty-first session."""
    return {"CAUSEWAY_PEER_SIGNING_KEY_FILE": str(tmp_path / "signing.key"), **more}


def write(tmp_path, text):
    p = tmp_path / "c.ini"
    p.write_text(text)
    return str(p)


def test_check_config_accepts_a_valid_file(tmp_path):
    schema = os.path.join(TOP_SRCDIR, "schema")
    p = write(tmp_path, f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n")
    r = run_causewayd(["--check-config", p], env=key_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "configuration valid" in r.stdout


def test_check_config_names_file_line_and_option(tmp_path):
    p = write(tmp_path, "[database]\nurl = x\n[server]\nport = 99999\n")
    r = run_causewayd(["--check-config", p])
    assert r.returncode == 1
    assert f"{p}:4: server.port: 99999 is out of range 0..65535" in r.stderr


def test_check_config_rejects_unknown_options(tmp_path):
    p = write(tmp_path, "[database]\nurl = x\nuser = bob\n")
    r = run_causewayd(["--check-config", p])
    assert r.returncode == 1
    assert "database.user: unknown option" in r.stderr


def test_a_line_longer_than_the_ini_parser_reads_is_refused_by_its_number(tmp_path):
    """libinih (Debian's build) reads a line into 200 bytes and parsed the
    rest as a line of its own: a long database.url was a syntax error on
    the wrong line, and the end of a long comment an option, taken when it
    named one (until the twentieth session)."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    ok = "; " + "c" * 197 + "\n"  # 199 bytes: read whole
    comment = "; " + "c" * 198 + "port = 1\n"  # its end was read as server.port = 1
    for text, line in ((f"[server]\n{comment}[database]\nurl = postgresql:///x\n", 2),
                       (f"[database]\nurl = postgresql:///x?application_name={'a' * 200}\n", 2)):
        r = run_causewayd(["--check-config", write(tmp_path, text)])
        assert r.returncode == 1 and f"c.ini:{line}: line longer than 199 bytes" in r.stderr, r.stderr
    # A NUL byte (a file saved as UTF-16) was told as a line too long.
    p = write(tmp_path, "")
    with open(p, "wb") as f:
        f.write("[database]\nurl = postgresql:///x\n".encode("utf-16"))
    r = run_causewayd(["--check-config", p])
    assert r.returncode == 1 and "c.ini:1: the line holds a NUL byte: is the file UTF-16? save it as UTF-8" \
        in r.stderr, r.stderr
    r = run_causewayd(["--check-config", write(tmp_path, f"[server]\n{ok}[database]\nurl = postgresql:///x\n"
                                                         f"schema_dir = {schema}\n")], env=key_env(tmp_path))
    assert r.returncode == 0, r.stderr


def test_xmpp_components_name_peers_a_peer_can_be(tmp_path):
    """Each PEER of xmpp.components is a name POST /admin/v1/peers takes
    (peer_name_valid): until the twenty-fourth session --check-config passed
    any, and the adapter's looser rule of its own let a daemon start with
    a component for a peer no peer can be (gk.example, -gk), which never
    matched."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    head = f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n[xmpp]\n"
    for bad in ("gk.example", "-gk", "GK", "a" * 33):
        p = write(tmp_path, f"{head}components = gk.localhost={bad}\n")
        r = run_causewayd(["--check-config", p])
        assert r.returncode == 1 and f'xmpp.components: "{bad}" is not a peer name' in r.stderr, r.stderr
    for bad, what in (("gk.localhost", "is not DOMAIN=PEER"), ("gk..localhost=gk", "is not a domain")):
        r = run_causewayd(["--check-config", write(tmp_path, f"{head}components = {bad}\n")])
        assert r.returncode == 1 and what in r.stderr, r.stderr
    # the daemon refuses it as it starts, before reaching the database
    r = run_causewayd(["--config", write(tmp_path, f"{head}components = gk.localhost=gk.example\n")])
    assert r.returncode == 1 and "configuration invalid" in r.stdout + r.stderr
    assert 'xmpp.components: \\"gk.example\\" is not a peer name' in r.stdout + r.stderr, r.stdout + r.stderr
    p = write(tmp_path, f"{head}secret = s\ndomain = example.org\n"
                        "components = gk.localhost=gk, wa.localhost=wa_2,tg.localhost=" + "a" * 32 + "\n")
    r = run_causewayd(["--check-config", p], env=key_env(tmp_path))
    assert r.returncode == 0, r.stderr


# Settings each option's own syntax takes but the daemon cannot run with:
# until the twenty-fourth session --check-config passed them ("configuration
# valid", exit 0) and only the start refused them, in the adapters' and the
# HTTP front's constructors, after it had migrated the database.
REFUSED_AT_START = (
    ("[xmpp]\ncomponents = gk.example.org=gk\n", "xmpp.secret is not set"),
    ("[xmpp]\ncomponents = gk.example.org=gk\nsecret = s\ndomain = a@example.org\n", "xmpp.domain (or server.domain)"),
    ("[xmpp]\ncomponents = gk.example.org=gk wa.example.org=gk\nsecret = s\n", "xmpp.components: "),
    ("[xmpp]\ncomponents = example.org=gk\nsecret = s\n", "xmpp.components: example.org is the users' own domain"),
    ("[xmpp]\ncomponents = ,\nsecret = s\n", "xmpp.components names no component"),
    ("[matrix]\nhomeserver_url = http://127.0.0.1:8008\n", "matrix.as_token or matrix.hs_token is not"),
    ("[matrix]\nhomeserver_url = http://127.0.0.1:8008\nas_token = same\nhs_token = same\n",
     "matrix.as_token and matrix.hs_token must differ"),
    ("[matrix]\nhomeserver_url = http://127.0.0.1:8008\nas_token = a b\nhs_token = hs\n",
     "matrix.as_token has a space"),
    # An empty prefix made the registration's namespace ^@.*:example\.org$, an exclusive claim on every user
    # of the homeserver, and refused every local user as a ghost (until the thirty-first session).
    ("[matrix]\nhomeserver_url = http://127.0.0.1:8008\nas_token = a\nhs_token = h\nuser_prefix =\n",
     "matrix.user_prefix must be 1 to 64 of the characters a Matrix localpart allows"),
    ("[matrix]\nhomeserver_url = http://127.0.0.1:8008\nas_token = a\nhs_token = h\nalias_prefix =\n",
     "matrix.alias_prefix must be 1 to 64 of the characters a Matrix localpart allows"),
    ("[matrix]\nuser_prefix = CW_\n", "matrix.user_prefix must be"),
    ("[matrix]\nalias_prefix = cw:\n", "matrix.alias_prefix must be"),
    ("[matrix]\nuser_prefix = " + "a" * 65 + "\n", "matrix.user_prefix must be"),
    ("[matrix]\nsender_localpart = bot@x\n", "matrix.sender_localpart must be"),
    ("[matrix]\nsender_localpart =\n", "matrix.sender_localpart must be"),
    # Values the daemon could not use, passed until the thirty-first session.
    ("[matrix]\nhomeserver_url = not a url\nas_token = a\nhs_token = h\n",
     'matrix.homeserver_url must be an http or https URL with a host (and without a user, query or fragment), '
     'not "not a url"'),
    ("[matrix]\nhomeserver_url = ftp://hs.example.org\nas_token = a\nhs_token = h\n",
     "matrix.homeserver_url must be an http or https URL"),
    ("[matrix]\nhomeserver_url = http://127.0.0.1:8008\nurl = javascript:x\nas_token = a\nhs_token = h\n",
     'matrix.url must be an http or https URL'),
    ("[matrix]\nhomeserver_url = http://127.0.0.1:8008/?x=1\nas_token = a\nhs_token = h\n",
     "matrix.homeserver_url must be an http or https URL"),
    ("[matrix]\nhomeserver_url = http://127.0.0.1:8008\nas_token = \"secret\"\nhs_token = h\n",
     "matrix.as_token is wrapped in quotes"),
    ("[matrix]\nhomeserver_url = http://127.0.0.1:8008\nas_token = a\nhs_token = 'secret'\n",
     "matrix.hs_token is wrapped in quotes"),
    # The same mistake in the XMPP component secret: every handshake refused,
    # tried again for ever (until the forty-first session).
    ("[xmpp]\ncomponents = gk.example.org=gk\nsecret = \"s3cret\"\n", "xmpp.secret is wrapped in quotes"),
    ("[xmpp]\ncomponents = gk.example.org=gk\nsecret = 's3cret'\n", "xmpp.secret is wrapped in quotes"),
    ("[server]\nca_file = /nonexistent/ca.pem\n", "server.ca_file: cannot read /nonexistent/ca.pem"),
    ("[server]\nca_file = /\n", "server.ca_file: / is not a file"),
    ("[peer]\nsignature_tag =\n", "peer.signature_tag must be"),
    ("[peer]\nsignature_tag = a\"b\n", "peer.signature_tag must be"),
    ("[server]\nlisten_address = localhost\n", "server.listen_address 'localhost' is not a numeric address"),
    ("[server]\nconnection_limit = 64\nconnection_limit_per_client = 65\n",
     "server.connection_limit_per_client (65) is above server.connection_limit (64)"),
    # Until the thirty-first session taken: every peer request then failed
    # its signature (a review's probe).
    ("[server]\npublic_url = causeway.example.org\n",
     'server.public_url must be an absolute http or https URL with a host'),
    # Until the forty-fourth session taken as written: a peer whose client
    # signed the normal form (https://gw.example.org) was refused every
    # request, the daemon checking the typed one (a review's finding).
    ("[server]\npublic_url = https://GW.example.org\n", 'server.public_url must be written in its normal form'),
    ("[server]\npublic_url = https://gw.example.org:443/causeway\n",
     'server.public_url must be written in its normal form'),
    ("[server]\npublic_url = http://gw.example.org:80\n", 'server.public_url must be written in its normal form'),
    # Until the thirty-fourth session taken as written: a server name that
    # is none made every ghost's and the bot's id unparseable (nothing was
    # bridged, and the registration's namespace matched no user), an XMPP
    # host that is none left every component down, trying again for ever.
    ("[matrix]\nserver_name = not a name\n", 'matrix.server_name must be a Matrix server name'),
    ("[matrix]\nserver_name = example.org:99999\n", 'matrix.server_name must be a Matrix server name'),
    ("[matrix]\nserver_name = @example.org\n", 'matrix.server_name must be a Matrix server name'),
    # the bot's id, @sender_localpart:server_name, past 255 bytes
    ("[matrix]\nsender_localpart = " + "b" * 100 + "\nserver_name = " + ".".join(["a" * 60] * 2 + ["a" * 38]) + "\n",
     'matrix.server_name must be a Matrix server name'),
    ("[xmpp]\nserver_host =\n", 'xmpp.server_host must be a host name or an IP address'),
    ("[xmpp]\nserver_host = xmpp server\n", 'xmpp.server_host must be a host name or an IP address'),
    ("[xmpp]\nserver_host = xmpp.example.org:5347\n", 'xmpp.server_host must be a host name or an IP address'),
)


def test_a_refused_url_is_quoted_without_its_password(tmp_path):
    """A URL with a user is refused, and the refusal quotes the value: until
    the thirty-fourth session with the password in it, on the terminal and
    in whatever collects the daemon's output.  Now libcurl's parser takes
    the password out; a value it cannot parse is not quoted if it has an
    '@'."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    head = f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n[server]\ndomain = example.org\n"
    cases = (
        ("[matrix]\nhomeserver_url = http://bob:hunter2@hs.example.org\nas_token = a\nhs_token = h\n",
         "matrix.homeserver_url must be", "bob:(password not shown)@hs.example.org"),
        ("[matrix]\nhomeserver_url = http://127.0.0.1:8008\nurl = https://as:hunter2@as.example.org:9000\n"
         "as_token = a\nhs_token = h\n", "matrix.url must be", "as:(password not shown)@as.example.org:9000"),
        ("public_url = https://op:hunter2@causeway.example.org\n", "server.public_url must be",
         "op:(password not shown)@causeway.example.org"),
        ("policy_url = https://op:hunter2@policy.example.org/terms\n", "server.policy_url must be",
         "op:(password not shown)@policy.example.org/terms"),
        ("[matrix]\nhomeserver_url = http://bob:hunter2@[bad\nas_token = a\nhs_token = h\n",
         "matrix.homeserver_url must be", "(not shown: it may have a password)"),
        # a review's finding: the abuse contact was still quoted whole
        ("abuse_contact = https://op:hunter2@abuse.example.org/\n", "server.abuse_contact must be",
         "op:(password not shown)@abuse.example.org/"),
        ("abuse_contact = mailto:op:hunter2@example.org\n", "server.abuse_contact must be",
         "(not shown: it may have a password)"),
    )
    for text, why, shown in cases:
        r = run_causewayd(["--check-config", write(tmp_path, head + text)])
        assert r.returncode == 1 and why in r.stderr and shown in r.stderr, (text, r.stderr)
        assert "hunter2" not in r.stderr + r.stdout, (text, r.stderr)
    # Without a password the value is quoted as it is.
    r = run_causewayd(["--check-config", write(tmp_path, head + "[matrix]\nhomeserver_url = http://bob@hs.example.org"
                                                             "\nas_token = a\nhs_token = h\n")])
    assert r.returncode == 1 and '"http://bob@hs.example.org"' in r.stderr, r.stderr


def test_check_config_refuses_what_the_start_would(tmp_path):
    schema = os.path.join(TOP_SRCDIR, "schema")
    head = f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n[server]\ndomain = example.org\n"
    for text, why in REFUSED_AT_START:
        text = text.replace("[server]\n", "")  # one [server] section: the head's
        r = run_causewayd(["--check-config", write(tmp_path, head + text)])
        assert r.returncode == 1 and why in r.stderr and "configuration valid" not in r.stdout, (text, r.stderr)


def test_matrix_server_names_and_xmpp_hosts_of_every_form_are_taken(tmp_path):
    """The forms the new checks take: a Matrix server name is a DNS name or
    an IP literal, a port may follow; the XMPP host is one for
    getaddrinfo."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    head = f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n[server]\ndomain = example.org\n"
    for name in ("example.org", "example.org:8448", "localhost", "127.0.0.1:8448", "[::1]:8448", "Matrix.Example.org"):
        r = run_causewayd(["--check-config", write(tmp_path, f"{head}[matrix]\nserver_name = {name}\n")],
                          env=key_env(tmp_path))
        assert r.returncode == 0, (name, r.stderr)
    # with '_' (container and /etc/hosts names) and a root's dot: the
    # resolver takes them, and the first version of the check did not
    for host in ("localhost", "127.0.0.1", "::1", "xmpp.example.org", "prosody", "xmpp_server",
                 "causeway_prosody_1", "xmpp.example.org."):
        r = run_causewayd(["--check-config", write(tmp_path, f"{head}[xmpp]\nserver_host = {host}\n")],
                          env=key_env(tmp_path))
        assert r.returncode == 0, (host, r.stderr)


def test_a_ca_file_must_hold_a_certificate(tmp_path):
    """server.ca_file is the CA bundle of every outbound HTTPS request: one
    without a certificate in PEM (a key, a DER file, the wrong file) was
    taken until the forty-seventh session's review, and libcurl then
    refused every such request.  A bundle with a key beside its certificate
    is taken (OpenSSL passes other blocks over)."""
    from harness import self_signed_ca

    schema = os.path.join(TOP_SRCDIR, "schema")
    head = f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n[server]\ndomain = example.org\n"
    cert, key = self_signed_ca(str(tmp_path), "a test CA")
    both = tmp_path / "both.pem"
    both.write_text(open(key).read() + open(cert).read())
    for ca in (cert, str(both)):
        r = run_causewayd(["--check-config", write(tmp_path, f"{head}ca_file = {ca}\n")], env=key_env(tmp_path))
        assert r.returncode == 0 and "configuration valid" in r.stdout, (ca, r.stderr)
    r = run_causewayd(["--check-config", write(tmp_path, f"{head}ca_file = {key}\n")], env=key_env(tmp_path))
    assert r.returncode == 1 and f"server.ca_file: {key} holds no certificate in PEM" in r.stderr, r.stderr


def test_the_start_refuses_them_before_touching_the_database(tmp_path, empty_db_url, pg):
    head = f"[database]\nurl = {empty_db_url}\nschema_dir = {SCHEMA_DIR}\n[peer]\n" \
        f"signing_key_file = {tmp_path}/signing.key\n[server]\ndomain = example.org\nport = 0\n"
    for text, why in REFUSED_AT_START:
        text = text.replace("[server]\n", "")
        r = run_causewayd(["--config", write(tmp_path, head + text)])
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "configuration invalid" in out and why.replace('"', '\\"') in out, (text, out)
        assert pg.psql("SELECT to_regclass('schema_migrations') IS NULL", db_url=empty_db_url) == "t", text
    assert not os.path.exists(tmp_path / "signing.key")
    # A key file the start cannot read stops it before the migrations too
    # (until the twenty-fourth session it was read after them).
    (tmp_path / "signing.key").write_text("not a key\n")
    (tmp_path / "signing.key").chmod(0o600)
    r = run_causewayd(["--config", write(tmp_path, head)])
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot load or create the signing key" in out, out
    assert pg.psql("SELECT to_regclass('schema_migrations') IS NULL", db_url=empty_db_url) == "t"


def test_check_config_reads_an_existing_signing_key_file(tmp_path):
    """A key file the start could not read is refused by --check-config
    too; a missing one is not (the start creates it)."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    key = tmp_path / "signing.key"
    p = write(tmp_path, f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n[peer]\nsigning_key_file = {key}\n")
    r = run_causewayd(["--check-config", p])
    assert r.returncode == 0 and not key.exists(), r.stderr
    key.write_text("not a key\n")
    key.chmod(0o600)
    r = run_causewayd(["--check-config", p])
    assert r.returncode == 1 and "peer.signing_key_file: " in r.stderr, r.stderr
    # A missing key in a directory that is not there: the start could not
    # create it (passed until the thirty-first session).
    p = write(tmp_path, f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n[peer]\n"
                        f"signing_key_file = {tmp_path}/absent/signing.key\n")
    r = run_causewayd(["--check-config", p])
    assert r.returncode == 1 and f"peer.signing_key_file: its directory {tmp_path}/absent" in r.stderr, r.stderr


def test_environment_overrides_and_is_validated(tmp_path):
    p = write(tmp_path, "[database]\nurl = x\n")
    r = run_causewayd(["--check-config", p], env={"CAUSEWAY_SERVER_PORT": "-5"})
    assert r.returncode == 1
    assert "CAUSEWAY_SERVER_PORT" in r.stderr
    r = run_causewayd(["--check-config", p], env={"CAUSEWAY_DATABASE_SCHEMA_DIR": "/nonexistent"})
    assert r.returncode == 1 and "/nonexistent" in r.stderr


def test_a_schema_dir_without_migrations_is_refused_naming_the_option(tmp_path):
    """A bad database.schema_dir is refused by --check-config and the start
    with the option's name, as every other option's (until the
    thirty-fourth session: "schema directory /x: ...", the option unnamed)."""
    for d, why in (("/nonexistent", "No such file or directory"), (str(tmp_path), "holds no NNN_name.sql")):
        p = write(tmp_path, f"[database]\nurl = postgresql:///x\nschema_dir = {d}\n")
        r = run_causewayd(["--check-config", p], env=key_env(tmp_path))
        assert r.returncode == 1 and "causewayd: database.schema_dir: " in r.stderr, r.stderr
        assert d in r.stderr and why in r.stderr, r.stderr
        r = run_causewayd(["--config", p], env=key_env(tmp_path))
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "option=database.schema_dir" in out and d in out and why in out, out
        assert not (tmp_path / "signing.key").exists()  # stopped before it made anything


def test_a_mistyped_environment_variable_is_refused(tmp_path):
    """A CAUSEWAY_<SECTION>_<NAME> of a known section naming no option was
    ignored: a typo (CAUSEWAY_SERVER_PROT) left the default in force without
    a word, where the same key in the file is refused (until the
    thirty-first session). Names of other sections, and causewayctl's
    CAUSEWAY_ADMIN_TOKEN, are not the daemon's and are left alone."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    p = write(tmp_path, f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n")
    for name in ("CAUSEWAY_SERVER_PROT", "CAUSEWAY_MATRIX_AS_TOKENS", "CAUSEWAY_LOG_", "CAUSEWAY_DATABASE_URL_"):
        r = run_causewayd(["--check-config", p], env=key_env(tmp_path, **{name: "1"}))
        assert r.returncode == 1 and f"environment {name}: unknown option" in r.stderr, (name, r.stderr)
    r = run_causewayd(["--config", p], env=key_env(tmp_path, CAUSEWAY_SERVER_PROT="8480"), timeout=20)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "configuration invalid" in out and "CAUSEWAY_SERVER_PROT" in out, out
    # An option's name in lower or mixed case was neither applied nor
    # refused (until the thirty-sixth session): refused, naming the
    # upper-case one.
    for name in ("CAUSEWAY_server_port", "causeway_log_level"):
        r = run_causewayd(["--check-config", p], env=key_env(tmp_path, **{name: "9000"}))
        assert r.returncode == 1 and f"environment {name}: not an option" in r.stderr, (name, r.stderr)
        assert f"did you mean {name.upper()}?" in r.stderr, r.stderr
    r = run_causewayd(["--config", p], env=key_env(tmp_path, CAUSEWAY_server_port="9000"), timeout=20)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "configuration invalid" in out and "CAUSEWAY_SERVER_PORT?" in out, out
    others = {"CAUSEWAY_ADMIN_TOKEN": "t", "CAUSEWAY_URL": "http://127.0.0.1:8480", "CAUSEWAY_CONFIG": "/x",
              "CAUSEWAY_TEST_JOBS": "2", "CAUSEWAY_PORT": "1", "CAUSEWAY_NODE_MODULES": "/x",
              "CAUSEWAY_SERVER_PORT": "8481", "causeway_url": "x", "causeway_admin_token": "t"}
    r = run_causewayd(["--check-config", p], env=key_env(tmp_path, **others))
    assert r.returncode == 0, r.stderr


def test_a_configuration_that_cannot_be_read_is_refused_not_taken_as_empty(tmp_path):
    """libinih takes a failed read for the end of the file: a directory
    named as the configuration (a mount point, --config /etc/causeway)
    was an empty file, and with the environment's database.url the
    daemon checked valid and started on the defaults (until the
    forty-first session)."""
    d = tmp_path / "causeway"
    d.mkdir()
    env = key_env(tmp_path, CAUSEWAY_DATABASE_URL="postgresql:///x", CAUSEWAY_DATABASE_SCHEMA_DIR=SCHEMA_DIR)
    r = run_causewayd(["--check-config", str(d)], env=env)
    assert r.returncode == 1 and f"{d}: cannot read: Is a directory" in r.stderr, (r.stdout, r.stderr)
    r = run_causewayd(["--config", str(d)], env=env, timeout=20)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "configuration invalid" in out and "cannot read: Is a directory" in out, out


def test_a_reload_of_a_file_that_cannot_be_read_keeps_the_running_configuration(make_daemon, db_url):
    """The same at a SIGHUP: with database.url in the environment (a
    secret kept out of the file), a configuration path that became a
    directory was read as an empty file and its defaults applied: the
    bootstrap token turned off, the log level back to info."""
    daemon = make_daemon(db_url)
    # what the file does not say is the environment's (in an install, the
    # defaults of schema_dir and signing_key_file are there)
    daemon.env.update({"CAUSEWAY_DATABASE_URL": db_url, "CAUSEWAY_DATABASE_SCHEMA_DIR": SCHEMA_DIR,
                       "CAUSEWAY_PEER_SIGNING_KEY_FILE": daemon.options["peer"].pop("signing_key_file")})
    del daemon.options["database"]["url"], daemon.options["database"]["schema_dir"]
    daemon.write_config()
    daemon.start()
    daemon.options["log"]["level"] = "debug"
    daemon.write_config()
    n = len(daemon.records)
    daemon.signal(signal.SIGHUP)
    rec = daemon.wait_for(lambda r: r.get("msg", "").startswith(("reload refused", "configuration reloaded")),
                          start=n)
    assert rec["msg"] == "configuration reloaded" and rec["changed"] == "1", rec
    saved = daemon.config_path + ".saved"
    os.rename(daemon.config_path, saved)
    os.mkdir(daemon.config_path)
    try:
        n = len(daemon.records)
        daemon.signal(signal.SIGHUP)
        rec = daemon.wait_for(lambda r: r.get("msg", "").startswith(("reload refused", "configuration reloaded")),
                              start=n)
        assert rec["msg"].startswith("reload refused") and "cannot read: Is a directory" in rec["detail"], rec
        assert not any(r.get("msg") == "option reloaded" for r in daemon.records[n:])
    finally:
        os.rmdir(daemon.config_path)
        os.rename(saved, daemon.config_path)
    auth = {"Authorization": "Bearer cwa_test-admin-token"}
    assert daemon.get("/admin/v1/whoami", headers=auth).status_code == 200
    level = [o["value"] for o in daemon.get("/admin/v1/config", headers=auth).json()["options"]
             if (o["section"], o["name"]) == ("log", "level")]
    assert level == ["debug"], level


def test_daemon_with_a_bad_config_exits_with_a_clear_error(tmp_path):
    p = write(tmp_path, "[server]\nport = 80x\n[database]\nurl = x\n")
    r = run_causewayd(["--config", p])
    assert r.returncode == 1
    assert "configuration invalid" in r.stdout + r.stderr
    assert "server.port: '80x' is not a whole number" in r.stdout + r.stderr


def test_missing_database_url_is_explained():
    r = run_causewayd([])
    assert r.returncode == 1
    assert "CAUSEWAY_DATABASE_URL" in r.stderr


def test_usage_errors():
    assert run_causewayd(["--bogus"]).returncode == 2
    assert run_causewayd(["extra"]).returncode == 2
    r = run_causewayd(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("causewayd ")


def test_the_command_line_is_the_documented_one(tmp_path):
    """docs/configuration.md's table of commands names every option the
    usage does, and the exit codes it gives are the daemon's."""
    usage = run_causewayd(["--help"])
    assert usage.returncode == 0
    doc = open(os.path.join(TOP_SRCDIR, "docs", "configuration.md")).read()
    commands = doc[doc.index("The command line of `causewayd`"):doc.index("- `causewayd --check-config FILE` validates")]
    assert set(re.findall(r"--[a-z][a-z-]*", usage.stdout)) == set(re.findall(r"--[a-z][a-z-]*", commands))
    for args in (["--bogus"], ["extra"], ["--check-config"], ["-c"], ["--bogus", "--version"]):
        r = run_causewayd(args)
        assert r.returncode == 2 and "Usage: causewayd" in r.stderr, args
    assert run_causewayd(["--list-options", "--bogus"]).returncode == 0
    # --check-config goes before --matrix-registration and --migrate, and
    # reads neither --config nor CAUSEWAY_CONFIG
    good = write(tmp_path, f"[database]\nurl = postgresql:///x\nschema_dir = {SCHEMA_DIR}\n")
    bad = tmp_path / "bad.ini"
    bad.write_text("[server]\nport = banana\n")
    for args in (["--migrate", "--check-config", good, "--config", str(bad)],
                 ["--check-config", good, "--matrix-registration"]):
        r = run_causewayd(args, env=key_env(tmp_path, CAUSEWAY_CONFIG=str(bad)))
        assert r.returncode == 0 and "configuration valid" in r.stdout, (args, r.stderr)


def test_docs_list_exactly_the_options_of_the_table():
    table = options()
    doc = open(os.path.join(TOP_SRCDIR, "docs", "configuration.md")).read()
    documented = set(re.findall(r"^\| `([a-z0-9_]+\.[a-z0-9_]+)` \|", doc, re.M))
    assert documented == set(table), (
        f"only in code: {sorted(set(table) - documented)}; only in docs: {sorted(documented - set(table))}")
    for name, row in table.items():
        env = row[4]
        assert f"`{env}`" in doc, f"{env} not in docs/configuration.md"
    # Each row's type, default, range (since the thirty-fourth session: the
    # page gave none, and an operator learnt them from the refusals),
    # applies, environment and meaning are the code's.
    for m in re.finditer(r"^\| `([a-z0-9_]+\.[a-z0-9_]+)` \| (.*) \|$", doc, re.M):
        typ, default, rng, applies, env, meaning = m.group(2).split(" | ", 5)
        row = table[m.group(1)]
        default = "" if default == "(empty)" else default.strip("`").split("`")[-1].strip("`")
        assert (typ, default, rng.strip(), applies, env.strip("`"), meaning) == \
            (row[1], row[2], row[6], row[3], row[4], row[5]), m.group(1)


def test_the_settings_the_peer_and_user_pages_name_are_there():
    """Every setting docs/interop-api.md, openapi.json, matrix.md, xmpp.md
    and policy.md name (`section.key`) is an option of the daemon's
    (--list-options) or a policy setting of the admin API's
    (gateway/policy_admin.c): a page that names a setting renamed or gone
    sends its reader to nothing.  Names of the same shape that are no
    setting (an audit action, `policy.deny`, `peer.block`) are string
    literals of the code."""
    table = set(options())
    sections = {name.split(".")[0] for name in table}
    literals = set()
    for pattern in ("gateway/*.c", "adapters/*/*.c", "policy/*.c"):
        for name in glob.glob(os.path.join(TOP_SRCDIR, pattern)):
            with open(name, encoding="utf-8") as f:
                literals |= set(re.findall(r"[\"']([a-z_]+\.[a-z_.]+)[\"']", f.read()))
    with open(os.path.join(TOP_SRCDIR, "gateway", "policy_admin.c"), encoding="utf-8") as f:
        settings = set(re.findall(r'\{ "(policy\.[a-z_]+)", ', f.read()))
    assert "policy.optin_default" in settings and "server.domain" in table, (settings, len(table))
    unknown = {}
    for page in ("interop-api.md", "matrix.md", "xmpp.md", "policy.md", "openapi.json"):
        with open(os.path.join(TOP_SRCDIR, "docs", page), encoding="utf-8") as f:
            text = f.read()
        shape = r"\b([a-z]+\.[a-z_]*[a-z])\b" if page.endswith(".json") else r"`([a-z]+\.[a-z_]*[a-z])`"
        named = {n for n in re.findall(shape, text) if n.split(".")[0] in sections
                 and n.split(".")[1] not in ("md", "c", "h", "py", "json", "test", "example")}  # a file, a domain
        gone = sorted(n for n in named if n not in table and n not in settings and n not in literals)
        if gone:
            unknown[page] = gone
    assert not unknown, unknown


def test_both_ends_of_every_documented_range_are_taken(tmp_path):
    """Every number at the low end of its range (docs/configuration.md's
    range column), then every one at the high end, is a file the daemon
    takes: no check of the options together refuses what the table
    allows. One past an end is refused (check_conf.c,
    numbers_take_their_range_and_nothing_past_it)."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    head = f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n"
    ranges = {name: row[6].split("..") for name, row in options().items() if row[1] in ("integer", "size")}
    for end in (0, 1):
        env = key_env(tmp_path, **{options()[name][4]: r[end] for name, r in ranges.items()})
        r = run_causewayd(["--check-config", write(tmp_path, head)], env=env)
        assert r.returncode == 0, (end, r.stderr)
    r = run_causewayd(["--check-config", write(tmp_path, head)], env=key_env(tmp_path, CAUSEWAY_SERVER_PORT="65536"))
    assert r.returncode == 1 and "server.port: 65536 is out of range 0..65535" in r.stderr, r.stderr

def test_example_config_lists_every_option_with_its_default():
    table = options()
    text = open(os.path.join(TOP_SRCDIR, "etc", "causeway.ini.example")).read()
    section = None
    seen = {}
    for line in text.splitlines():
        m = re.match(r"^\[(\w+)\]", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^;?\s*([a-z0-9_]+)\s*=\s*(.*)$", line)
        if m and section:
            seen[f"{section}.{m.group(1)}"] = m.group(2).strip()
    assert set(seen) == set(table), f"differ: {sorted(set(seen) ^ set(table))}"
    for name, row in table.items():
        if name in ("database.schema_dir", "peer.signing_key_file"):
            continue  # the default depends on the install prefix
        assert seen[name] == row[2], f"{name}: example says {seen[name]!r}, default is {row[2]!r}"


def test_example_config_is_valid(tmp_path):
    text = open(os.path.join(TOP_SRCDIR, "etc", "causeway.ini.example")).read()
    text = text.replace("\n; url =", "\nurl =", 1) if "\n; url =" in text else text
    p = write(tmp_path, text)
    r = run_causewayd(["--check-config", p], env=key_env(
        tmp_path, CAUSEWAY_DATABASE_URL="postgresql:///x",
        CAUSEWAY_DATABASE_SCHEMA_DIR=os.path.join(TOP_SRCDIR, "schema")))
    assert r.returncode == 0, r.stderr


def test_reload_checks_the_schema_dir_and_the_key_file_as_the_start_would(daemon, tmp_path):
    """database.schema_dir and peer.signing_key_file take effect at a
    restart. A SIGHUP with a value there the start would refuse (no such
    directory, a file that is no key, a key file's directory missing) said
    "takes effect after a restart", and that restart failed (until the
    thirty-sixth session): the reload now checks them as --check-config
    does, and such a file is refused whole, the running configuration
    kept. A usable new value still waits for the restart, as every
    restart-only option does, and the key file is not made by a reload."""
    def sighup():
        n = len(daemon.records)
        daemon.signal(signal.SIGHUP)
        rec = daemon.wait_for(lambda r: r.get("msg", "").startswith(("reload refused", "configuration reloaded")),
                              start=n)
        return rec, n

    opts = {k: dict(v) for k, v in daemon.options.items()}
    garbage = tmp_path / "not-a-key.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    nowhere = str(tmp_path / "nowhere")
    for section, name, value, why in (
            ("database", "schema_dir", nowhere, f"database.schema_dir: schema directory {nowhere}: "),
            ("peer", "signing_key_file", nowhere + "/signing.key",
             f"peer.signing_key_file: its directory {nowhere} does not exist"),
            ("peer", "signing_key_file", str(garbage), f"peer.signing_key_file: {garbage}")):
        daemon.options["log"]["level"] = "debug"
        daemon.options[section][name] = value
        daemon.write_config()
        rec, n = sighup()
        assert rec["msg"].startswith("reload refused") and why in rec["detail"], (why, rec)
        assert not any(r.get("msg") == "option reloaded" for r in daemon.records[n:])
        daemon.options.clear()
        daemon.options.update({k: dict(v) for k, v in opts.items()})
    # Usable new values: the reload goes on, they wait for a restart.
    schema = tmp_path / "schema"
    shutil.copytree(daemon.options["database"]["schema_dir"], schema)
    daemon.options["database"]["schema_dir"] = str(schema)
    daemon.options["peer"]["signing_key_file"] = str(tmp_path / "new.key")
    daemon.options["log"]["level"] = "debug"
    daemon.write_config()
    rec, n = sighup()
    assert rec["msg"] == "configuration reloaded" and rec["changed"] == "1", rec
    later = {r.get("option") for r in daemon.records[n:] if r.get("msg", "").startswith("option changed")}
    assert later == {"schema_dir", "signing_key_file"}, later
    assert not (tmp_path / "new.key").exists()
    assert daemon.get("/healthz").status_code == 200


def test_a_malformed_database_url_never_shows_its_password():
    r = run_causewayd([], env={"CAUSEWAY_DATABASE_URL": "postgresql://causeway:s3cret%zzpw@localhost/causeway",
                               "CAUSEWAY_DATABASE_SCHEMA_DIR": SCHEMA_DIR}, timeout=30)
    assert r.returncode != 0
    assert "not a valid PostgreSQL URL" in r.stderr and "s3cret" not in r.stderr + r.stdout, r.stderr


def test_a_url_libpq_would_take_for_a_database_name_is_refused_unshown(tmp_path):
    """libpq takes a value that is neither a postgresql:// URL nor
    key=value pairs for a database's name, on the default socket: a URL
    written in quotes (as other INI dialects want) or of another scheme
    was checked valid, the start asked that server for a database so
    named, and logged its refusal, which quotes the name, password and all
    (until the forty-first session). A plain name is still one."""
    for url in ('"postgresql://causeway:s3cretpw@db.example/causeway"',
                "'postgresql://causeway:s3cretpw@db.example/causeway'",
                "jdbc:postgresql://db.example/causeway?user=causeway&password=s3cretpw",
                "pgsql://causeway:s3cretpw@db.example/causeway",
                "causeway:s3cretpw@db.example/causeway"):
        env = key_env(tmp_path, CAUSEWAY_DATABASE_URL=url, CAUSEWAY_DATABASE_SCHEMA_DIR=SCHEMA_DIR)
        r = run_causewayd(["--check-config", write(tmp_path, "")], env=env)
        assert r.returncode == 1 and "database.url is not a valid PostgreSQL URL" in r.stderr, (url, r.stdout,
                                                                                                r.stderr)
        assert "s3cretpw" not in r.stderr + r.stdout, (url, r.stderr)
        # the start: refused before any connection, nothing of it shown
        r = run_causewayd([], env=dict(env, CAUSEWAY_DATABASE_STARTUP_TIMEOUT_MS="0"), timeout=30)
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "configuration invalid" in out and "s3cretpw" not in out, (url, out)
    # "postgres" and "postgres_x" are names too (they were refused as bad
    # URLs until the forty-first session: any value beginning "postgres").
    for url in ("causeway", "dbname=causeway password=s3cretpw", "postgresql:///causeway", "postgres",
                "postgres_causeway", "postgres:///causeway"):
        env = key_env(tmp_path, CAUSEWAY_DATABASE_URL=url, CAUSEWAY_DATABASE_SCHEMA_DIR=SCHEMA_DIR)
        r = run_causewayd(["--check-config", write(tmp_path, "")], env=env)
        assert r.returncode == 0, (url, r.stderr)


def registration(r):
    """The id and tokens of a --matrix-registration output, as written."""
    assert r.returncode == 0, r.stderr
    return dict(re.findall(r'^(id|as_token|hs_token): "(.*)"$', r.stdout, re.M))


def test_an_indented_line_is_an_option_not_the_value_of_the_one_above(tmp_path):
    """Debian's libinih reads a line with leading whitespace as the
    continuation of the option above, which took it as its value: the
    matrix.id was "hs_token = ..." (a secret the configuration API showed),
    the tokens unset, and --check-config said valid (until the
    twenty-fourth session).  The spec's INI is pgbouncer.ini's, where an
    indented option is an option."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    p = write(tmp_path, f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n"
                        "[matrix]\nhomeserver_url = http://127.0.0.1:8008\nid = causeway\n"
                        "    as_token = SECRET-AS\n\ths_token = SECRET-HS\n"
                        "  [server]\n    listen_address = 127.0.0.1\n    port = 99999\n")
    r = run_causewayd(["--check-config", p])
    assert r.returncode == 1 and f"{p}:11: server.port: 99999 is out of range" in r.stderr, r.stderr
    p = write(tmp_path, open(p).read().replace("99999", "8999"))
    r = run_causewayd(["--check-config", p], env=key_env(tmp_path))
    assert r.returncode == 0, r.stderr
    r = run_causewayd(["--matrix-registration", "--config", p])
    assert registration(r) == {"id": "causeway", "as_token": "SECRET-AS", "hs_token": "SECRET-HS"}


def test_a_semicolon_after_a_space_is_refused_not_taken_as_a_comment(tmp_path):
    """libinih takes ';' after whitespace as the start of a comment, which
    silently cut "as_token = abc ;def" to "abc" (until the twenty-fourth
    session).  Such a line is refused by its number; a ';' elsewhere is
    part of the value, and a value holding " ;" comes from the
    environment."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    head = (f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n"
            "[matrix]\nhomeserver_url = http://127.0.0.1:8008\n")
    for line in ("as_token = abc ;def", "id = foo ;bar", "id = causeway ; the registration's id"):
        p = write(tmp_path, head + line + "\n")
        for args in (["--check-config", p], ["--matrix-registration", "--config", p]):
            r = run_causewayd(args)
            assert r.returncode == 1 and f"{p}:6: ';' after a space starts a comment" in r.stderr, r.stderr
            assert "CAUSEWAY_<SECTION>_<NAME>" in r.stderr
    p = write(tmp_path, head + "id = foo;bar\nas_token = abc;def\n")
    r = run_causewayd(["--check-config", p], env=key_env(tmp_path, CAUSEWAY_MATRIX_HS_TOKEN="x"))
    assert r.returncode == 0, r.stderr
    r = run_causewayd(["--matrix-registration", "--config", p], env={"CAUSEWAY_MATRIX_HS_TOKEN": "x"})
    assert registration(r) == {"id": "foo;bar", "as_token": "abc;def", "hs_token": "x"}
    # The environment's value is taken as written, " ;" and all: for
    # matrix.id it is then refused for its space (since the thirty-sixth
    # session), not cut to "foo".
    r = run_causewayd(["--matrix-registration", "--config", write(tmp_path, head)],
                      env={"CAUSEWAY_MATRIX_ID": "foo ;bar"})
    assert r.returncode == 1 and "matrix.id has white space" in r.stderr, r.stderr
    r = run_causewayd(["--matrix-registration", "--config", write(tmp_path, head)],
                      env={"CAUSEWAY_MATRIX_ID": "foo;;bar"})
    assert registration(r)["id"] == "foo;;bar"


def test_a_matrix_id_the_homeserver_could_not_be_given_is_refused(tmp_path):
    """matrix.id is the registration's id and a segment of the ping's
    path: empty, with white space or a control character, showing nothing
    or past 255 bytes it was taken (until the thirty-sixth session), by
    --check-config, the start and --matrix-registration alike."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    head = f"[database]\nurl = postgresql:///x\nschema_dir = {schema}\n[matrix]\n"
    for value, why in (("", "matrix.id must be 1 to 255 bytes (it is 0)"),
                       ("my bridge", "matrix.id has white space or a control character (U+0020 at byte 3)"),
                       ("a\u200bb", "matrix.id has a character that shows nothing (U+200B at byte 2)"),
                       ("x" * 256, "matrix.id must be 1 to 255 bytes (it is 256)")):
        p = write(tmp_path, head)
        env = key_env(tmp_path, CAUSEWAY_MATRIX_ID=value)
        for args in (["--check-config", p], ["--matrix-registration", "--config", p]):
            r = run_causewayd(args, env=env)
            assert r.returncode == 1 and why in r.stderr, (value, args, r.stderr)
        r = run_causewayd(["--config", p], env=env, timeout=20)
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "configuration invalid" in out and why in out, (value, out)
    p = write(tmp_path, head + "id = brücke-2\n")
    assert run_causewayd(["--check-config", p], env=key_env(tmp_path)).returncode == 0
    assert registration(run_causewayd(["--matrix-registration", "--config", p]))["id"] == "brücke-2"


def test_reload_refuses_what_the_start_would(daemon):
    """SIGHUP reads the file with cfg_load too: a file the start would
    refuse is refused whole, the running configuration kept (until the
    twenty-fourth session such a file was taken and its reloadable options
    applied)."""
    for section, name, value, why in (("server", "listen_address", "localhost", "server.listen_address 'localhost'"),
                                      ("xmpp", "components", "gk.example.org=gk", "xmpp.secret is not set"),
                                      ("matrix", "id", "my bridge", "matrix.id has white space")):
        opts = {k: dict(v) for k, v in daemon.options.items()}
        daemon.options["log"]["level"] = "debug"
        daemon.options.setdefault(section, {})[name] = value
        daemon.write_config()
        n = len(daemon.records)
        daemon.signal(signal.SIGHUP)
        rec = daemon.wait_for(lambda r: r.get("msg", "").startswith(("reload refused", "configuration reloaded")),
                              start=n)
        assert rec["msg"].startswith("reload refused") and why in rec["detail"], rec
        daemon.options.clear()
        daemon.options.update(opts)
    assert not any(r.get("msg") == "option reloaded" for r in daemon.records)
    assert daemon.get("/healthz").status_code == 200


def test_a_restart_only_change_read_by_a_reload_is_shown_as_pending(daemon):
    """A SIGHUP that reads a new value of an option that takes effect at a
    restart only leaves the value in force, and GET /admin/v1/config shows
    the one waiting (`pending`, a secret masked) until the file says the
    value in force again.  Until the fifty-first session only the log's
    warning said so: an operator who looked at the console saw nothing
    waiting."""
    def sighup():
        n = len(daemon.records)
        daemon.signal(signal.SIGHUP)
        rec = daemon.wait_for(lambda r: r.get("msg", "").startswith(("reload refused", "configuration reloaded")),
                              start=n)
        assert rec["msg"] == "configuration reloaded", rec

    def option(section, name):
        (o,) = [o for o in daemon.admin("GET", "/config").json()["options"]
                if (o["section"], o["name"]) == (section, name)]
        return o
    before = option("database", "pool_size")
    assert before["pending"] is None and before["reloadable"] is False
    saved = {k: dict(v) for k, v in daemon.options.items()}
    try:
        daemon.options.setdefault("database", {})["pool_size"] = str(int(before["value"]) + 3)
        daemon.options.setdefault("xmpp", {})["secret"] = "a-new-hs-token-of-enough-length-0123456789"
        daemon.options["log"]["level"] = "debug"   # a reloadable one: taken, nothing pending
        daemon.write_config()
        sighup()
        now = option("database", "pool_size")
        assert (now["value"], now["pending"]) == (before["value"], str(int(before["value"]) + 3)), now
        hs = option("xmpp", "secret")
        assert (hs["value"], hs["pending"]) == ("", "********"), hs
        assert "a-new-hs-token" not in daemon.admin("GET", "/config").text
        level = option("log", "level")
        assert (level["value"], level["pending"]) == ("debug", None), level
    finally:
        daemon.options.clear()
        daemon.options.update(saved)
    daemon.write_config()
    sighup()
    assert option("database", "pool_size")["pending"] is None
    assert option("xmpp", "secret")["pending"] is None


def test_a_reload_replaces_the_bootstrap_token(daemon):
    """admin.token_sha256 is reloadable: a SIGHUP with a new hash turns the
    old bootstrap token off and the new one on in this process, and an
    emptied one turns it off (named tokens go on). Until the fortieth
    session the option waited for a restart, and a leaked bootstrap token
    kept working until every process had been restarted. The hash is
    replaced under the lock the token checks take, and the option's old
    text kept alive, while requests read both (GET /admin/v1/config
    throughout: the sanitized build finds a use after free)."""
    import hashlib
    import threading

    import requests

    def bearer(token):
        return {"Authorization": "Bearer " + token}

    def whoami(token):
        return daemon.get("/admin/v1/whoami", headers=bearer(token))

    def sighup():
        n = len(daemon.records)
        daemon.signal(signal.SIGHUP)
        rec = daemon.wait_for(lambda r: r.get("msg", "").startswith(("reload refused", "configuration reloaded")),
                              start=n, timeout=30)
        return rec, daemon.records[n:]

    old = daemon.options["admin"]["token_sha256"]
    assert whoami("cwa_test-admin-token").status_code == 200
    named = daemon.admin("POST", "/tokens", json={"name": "ops"})
    assert named.status_code == 201, named.text
    ops = named.json()["token"]

    # Requests that read the option (and check tokens) all along.
    stop = threading.Event()
    seen = []

    def reader():
        while not stop.is_set():
            try:
                r = daemon.get("/admin/v1/config", headers=bearer(ops), timeout=30)
                seen.append(r.status_code)
            except requests.RequestException as ex:  # the daemon died: said below
                seen.append(repr(ex))
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        new = "cwa_the-new-bootstrap-token"
        new_hash = hashlib.sha256(new.encode()).hexdigest()
        for _ in range(3):  # back and forth: each reload replaces the string read meanwhile
            for h in (new_hash, old):
                daemon.options["admin"]["token_sha256"] = h
                daemon.write_config()
                rec, recs = sighup()
                assert rec["msg"] == "configuration reloaded" and rec["changed"] == "1", rec
                done = [r for r in recs if r.get("msg") == "option reloaded"]
                assert [(r["section"], r["option"], r["value"]) for r in done] == \
                    [("admin", "token_sha256", "********")], done
                assert not any(r.get("msg", "").startswith("option changed") for r in recs), recs
                assert h not in "\n".join(daemon.lines[-len(recs):])
        daemon.options["admin"]["token_sha256"] = new_hash
        daemon.write_config()
        rec, _ = sighup()
        assert rec["changed"] == "1", rec
    finally:
        stop.set()
        t.join(60)
    assert seen and all(s == 200 for s in seen), [s for s in seen if s != 200][:5]

    # The old token is refused, the new one is the bootstrap token.
    assert whoami("cwa_test-admin-token").status_code == 401
    r = whoami(new)
    assert r.status_code == 200 and r.json()["name"] == "config", r.text
    opt = [o for o in daemon.get("/admin/v1/config", headers=bearer(new)).json()["options"]
           if (o["section"], o["name"]) == ("admin", "token_sha256")]
    assert opt == [dict(opt[0], value="********", reloadable=True, secret=True)], opt

    # Emptied: no bootstrap token at all; the named one goes on.
    daemon.options["admin"]["token_sha256"] = ""
    daemon.write_config()
    rec, recs = sighup()
    assert rec["changed"] == "1", rec
    assert [r["value"] for r in recs if r.get("msg") == "option reloaded"] == [""]
    assert whoami(new).status_code == 401
    assert whoami("cwa_test-admin-token").status_code == 401
    assert whoami(ops).status_code == 200
    # Set again: on again, without a restart.
    daemon.options["admin"]["token_sha256"] = new_hash
    daemon.write_config()
    assert sighup()[0]["changed"] == "1"
    assert whoami(new).status_code == 200


def test_a_configuration_file_others_may_write_is_refused_one_they_may_read_with_a_secret_told(tmp_path):
    """spec/quality.md: the secrets the daemon uses itself are readable by
    it alone.  Until the forty-fourth session the file was read whatever
    its mode: one every user could write (and so give itself the admin
    token's hash) was taken, and one every user could read with the XMPP
    secret or the database's password in it without a word."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    base = f"[database]\nschema_dir = {schema}\n[server]\ndomain = example.org\n"
    secret = "[xmpp]\ncomponents = gk.example.org=gk\nsecret = s3cret-value\n"
    url_pw = "[database]\nurl = postgresql://cw:hunter2@127.0.0.1/cw\n"
    url = "[database]\nurl = postgresql:///cw\n"
    # a key=value string, and a URI's query, carry a password too
    kv_pw = "[database]\nurl = host=127.0.0.1 dbname=cw password=hunter2\n"
    query_pw = "[database]\nurl = postgres://127.0.0.1/cw?password=hunter2\n"

    def check(text, mode, **env):
        p = write(tmp_path, text)
        os.chmod(p, mode)
        return run_causewayd(["--check-config", p], env=key_env(tmp_path, **env))

    for text in (url + base, url_pw + base, url + base + secret):
        r = check(text, 0o666)
        assert r.returncode == 1, r.stdout
        assert "has mode 0666: every user of the host may change it" in r.stderr, r.stderr
        assert "hunter2" not in r.stderr and "s3cret" not in r.stderr
    for text, what in ((url_pw + base, "database.url's password"), (kv_pw + base, "database.url's password"),
                       (query_pw + base, "database.url's password"), (url + base + secret, "xmpp.secret")):
        r = check(text, 0o644)
        assert r.returncode == 0 and "configuration valid" in r.stdout, r.stderr
        assert f"warning: {tmp_path}/c.ini has mode 0644: every user of the host may read it, and it holds " \
            f"{what}" in r.stderr, r.stderr
        assert "hunter2" not in r.stderr and "s3cret" not in r.stderr
        for quiet in (0o640, 0o600):  # the daemon's group may read it
            r = check(text, quiet)
            assert r.returncode == 0 and r.stderr == "", r.stderr
    # nothing secret in it, or the secret set by the environment alone
    for text, env in ((url + base, {}), (url + base + "[admin]\ntoken_sha256 = " + "a" * 64 + "\n", {}),
                      (url + base + "[xmpp]\ncomponents = gk.example.org=gk\n", {"CAUSEWAY_XMPP_SECRET": "other"}),
                      (url + base + "[xmpp]\ncomponents = gk.example.org=gk\nsecret =\n",
                       {"CAUSEWAY_XMPP_SECRET": "other"}),
                      (url + base, {"CAUSEWAY_DATABASE_URL": "postgresql://cw:hunter2@127.0.0.1/cw"})):
        r = check(text, 0o644, **env)
        assert r.returncode == 0 and r.stderr == "", r.stderr
    # The environment wins, but the file still gives its secret away to
    # every user (until the forty-seventh session's review this was not said).
    for text, env, what in ((url + base + secret, {"CAUSEWAY_XMPP_SECRET": "other"}, "xmpp.secret"),
                            (url_pw + base, {"CAUSEWAY_DATABASE_URL": "postgresql:///cw"},
                             "database.url's password")):
        r = check(text, 0o644, **env)
        assert r.returncode == 0 and "configuration valid" in r.stdout, r.stderr
        env_name = next(iter(env))
        assert f"0644: every user of the host may read it, and it holds {what}; chmod o-r (600, or 640 with the " \
            f"daemon's group), or take it out of the file: the environment sets it too ({env_name}), and wins" \
            in r.stderr, r.stderr
        assert "hunter2" not in r.stderr and "s3cret" not in r.stderr


def test_a_configuration_file_others_may_replace_is_refused(tmp_path):
    """A file in a directory every user may write (without the sticky bit),
    or a link into one, or a link in one, is as good as one they may write:
    any user may rename it and put their own in its place (another
    database, their own admin token's hash).  Until the fiftieth session's
    review only the file's own mode was looked at, and such a file was
    taken."""
    schema = os.path.join(TOP_SRCDIR, "schema")
    text = f"[database]\nurl = postgresql://cw:hunter2@127.0.0.1/cw\nschema_dir = {schema}\n"
    open_dir, safe = tmp_path / "open", tmp_path / "safe"
    open_dir.mkdir()
    safe.mkdir()
    os.chmod(open_dir, 0o777)  # chmod: the umask would take o+w away
    inside, kept = open_dir / "c.ini", safe / "c.ini"
    for p in (inside, kept):
        p.write_text(text)
        os.chmod(p, 0o600)
    (safe / "to-open.ini").symlink_to(inside)
    (open_dir / "to-safe.ini").symlink_to(kept)

    def check(p):
        return run_causewayd(["--check-config", str(p)], env=key_env(tmp_path))

    for p, said in ((inside, f"{inside} is in {open_dir}, mode 0777: every user of the host may put another "
                             "file in its place"),
                    (safe / "to-open.ini", f"{safe}/to-open.ini, a link to {inside} is in {open_dir}, mode 0777"),
                    (open_dir / "to-safe.ini", f"{open_dir}/to-safe.ini is in {open_dir}, mode 0777")):
        r = check(p)
        assert r.returncode == 1 and "configuration valid" not in r.stdout, r.stdout
        assert said in r.stderr and "chmod o-w (or +t) that directory" in r.stderr, r.stderr
        assert "hunter2" not in r.stderr
    # under such a directory too: the directory itself may be renamed
    (open_dir / "sub").mkdir(mode=0o700)
    below = open_dir / "sub" / "c.ini"
    below.write_text(text)
    os.chmod(below, 0o600)
    r = check(below)
    assert r.returncode == 1 and f"{below} is in {open_dir}, mode 0777" in r.stderr, r.stderr
    # the sticky bit (as /tmp's) keeps others from renaming what is not theirs
    os.chmod(open_dir, 0o1777)
    for p in (inside, safe / "to-open.ini", open_dir / "to-safe.ini", below, kept):
        r = check(p)
        assert r.returncode == 0 and "configuration valid" in r.stdout and r.stderr == "", r.stderr
    os.chmod(open_dir, 0o775)  # the group's writing is left alone, as the file's
    r = check(inside)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_the_start_and_a_reload_refuse_a_configuration_file_others_may_write(make_daemon, db_url, empty_db_url, pg):
    """The start refuses it before it touches the database, and tells one
    others may read with a secret; a reload refuses it and keeps the
    running configuration."""
    d = make_daemon(empty_db_url)
    os.chmod(d.config_path, 0o646)
    d.start(wait_ready=False)
    assert d.wait_exit(30) == 1
    rec = d.wait_for(lambda r: r.get("msg") == "configuration invalid")
    assert "has mode 0646: every user of the host may change it" in rec["detail"], rec
    assert pg.psql("SELECT to_regclass('schema_migrations') IS NULL", db_url=empty_db_url) == "t"

    d = make_daemon(db_url, options={"xmpp": {"components": "gk.example.org=gk", "secret": "s3cret-value",
                                              "server_port": "1", "reconnect_max_ms": "1000"}})
    os.chmod(d.config_path, 0o644)
    d.start()
    rec = d.wait_for(lambda r: r.get("msg") == "the configuration file is readable by every user")
    assert rec["level"] == "warn" and "it holds xmpp.secret" in rec["detail"], rec
    assert "s3cret" not in d.log()
    os.chmod(d.config_path, 0o666)
    d.options["log"]["level"] = "debug"
    d.write_config()
    n = len(d.records)
    d.signal(signal.SIGHUP)
    rec = d.wait_for(lambda r: r.get("msg", "").startswith(("reload refused", "configuration reloaded")), start=n)
    assert rec["msg"].startswith("reload refused") and "has mode 0666" in rec["detail"], rec
    auth = {"Authorization": "Bearer cwa_test-admin-token"}
    level = [o["value"] for o in d.get("/admin/v1/config", headers=auth).json()["options"]
             if (o["section"], o["name"]) == ("log", "level")]
    assert level == ["info"], level
    os.chmod(d.config_path, 0o600)
    n = len(d.records)
    d.signal(signal.SIGHUP)
    rec = d.wait_for(lambda r: r.get("msg", "").startswith(("reload refused", "configuration reloaded")), start=n)
    assert rec["msg"] == "configuration reloaded" and rec["changed"] == "1", rec
    assert not any(r.get("msg") == "the configuration file is readable by every user" for r in d.records[n:])


def test_a_registration_needs_no_database(tmp_path):
    """--matrix-registration connects to nothing: a configuration without
    database.url prints it (until the forty-fifth session it was refused,
    "database.url is not set", and an operator setting up the homeserver
    first had to invent one), while --check-config and the start still
    refuse it. A database.url that is set is still checked."""
    text = "[server]\ndomain = example.org\nport = 8999\n[matrix]\nhomeserver_url = http://127.0.0.1:8008\n"
    p = write(tmp_path, text)
    r = run_causewayd(["--matrix-registration", "--config", p])
    assert r.returncode == 0 and 'url: "http://127.0.0.1:8999"' in r.stdout, r.stderr
    assert "regex: '^@_cw_.*:example\\.org$'" in r.stdout, r.stdout
    assert set(registration(r)) == {"id", "as_token", "hs_token"}
    r = run_causewayd(["--check-config", p])
    assert r.returncode == 1 and "database.url is not set" in r.stderr, r.stderr
    r = run_causewayd(["--matrix-registration", "--config", p], env={"CAUSEWAY_DATABASE_URL": "mysql://x"})
    assert r.returncode == 1 and "database.url" in r.stderr and not r.stdout, r.stderr


def test_a_registration_is_not_printed_with_port_0(tmp_path):
    """server.port = 0 (any free port) without matrix.url printed the
    registration's url as http://127.0.0.1:0, which no homeserver reaches
    (until the forty-fourth session); with matrix.url, or a port, it is
    printed."""
    head = "[database]\nurl = postgresql:///x\n[server]\ndomain = example.org\nport = 0\n" \
        "[matrix]\nhomeserver_url = http://127.0.0.1:8008\n"
    r = run_causewayd(["--matrix-registration", "--config", write(tmp_path, head)])
    assert r.returncode == 1 and not r.stdout, r.stdout
    assert "server.port is 0 (any free port) and matrix.url is not set" in r.stderr, r.stderr
    r = run_causewayd(["--matrix-registration", "--config", write(tmp_path, head + "url = http://10.0.0.5:8480\n")])
    assert r.returncode == 0 and 'url: "http://10.0.0.5:8480"' in r.stdout, r.stderr
    r = run_causewayd(["--matrix-registration", "--config", write(tmp_path, head.replace("port = 0", "port = 8999"))])
    assert r.returncode == 0 and 'url: "http://127.0.0.1:8999"' in r.stdout, r.stderr
