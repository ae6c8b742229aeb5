"""A real Prosody (Debian's prosody 0.12 package) started by the tests, and real
XMPP clients (slixmpp) logged in over c2s to it, for the tests of the XMPP
adapter.

    p = Prosody(tmp_path / "prosody", host="xmpp.test",
                components={"gk.xmpp.test": "component-secret"})
    p.start()
    p.register("alice", "pw-alice")
    alice = XmppClient("alice@xmpp.test", "pw-alice", port=p.c2s_port).connect()
    sid = alice.send_message("bob@xmpp.test", "hi")
    m = bob.wait_for_message(lambda el: el.body == "hi")   # an ElementTree element
    alice.disconnect()
    p.stop()

What the daemon needs to reach Prosody: p.address ("127.0.0.1"),
p.component_port, p.component_names / p.components ({name: secret}), p.secret,
p.host (the VirtualHost).

Prosody runs in the foreground as a child process, from a configuration of its
own (loopback only, its own ports, no s2s, no TLS, no HTTP, plain-text
passwords and PLAIN allowed over unencrypted c2s), with its data, pidfile and
log in its own directory. Prosody refuses to run as root: as root it (and
prosodyctl) runs as the `prosody` system user through setpriv, in a directory
that user owns (a private one under /tmp when the requested one is not
reachable by that user, as pytest's /tmp/pytest-of-root is not). Every
instance still running when the interpreter exits is killed, and the server
also gets SIGKILL if the thread that started it dies (parent death signal).

Stanzas received by an XmppClient are kept, in order, as Stanza objects:
xml.etree.ElementTree elements (tags namespaced: "{jabber:client}message")
with .xml (the stanza as XML text), .body and .error_condition.
"""
import asyncio
import atexit
import copy
import ctypes
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

from harness import TOP_SRCDIR

PROSODY = os.environ.get("PROSODY", "/usr/bin/prosody")
PROSODYCTL = os.environ.get("PROSODYCTL", "/usr/bin/prosodyctl")
PROSODY_USER = "prosody"
# Causeway's own Prosody modules, copied into each instance's plugins/ directory.
CONTRIB_PROSODY = os.path.join(TOP_SRCDIR, "contrib", "prosody")

NS_CLIENT = "jabber:client"
NS_STREAM = "http://etherx.jabber.org/streams"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_STREAMS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_COMPONENT = "jabber:component:accept"
NS_ROSTER = "jabber:iq:roster"
NS_SID = "urn:xmpp:sid:0"

_LIVE = set()          # Prosody instances that may have a process or a private directory


_PORTS_GIVEN = set()   # never hand the same port to two instances of one run


def _free_port():
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port
    raise RuntimeError("no free port")


def _lua(s):
    """A Lua string literal (bytes outside a safe set as decimal escapes)."""
    safe = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ./_-:@+=,")
    return '"' + "".join(chr(b) if b in safe else "\\%03d" % b for b in str(s).encode()) + '"'


def _port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _pdeathsig_kill():
    """preexec_fn: SIGKILL this child when the thread that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Prosody:
    """A private Prosody. directory: where its configuration, data, pidfile and log go (created; str or
    Path). components: {name: secret}, or names that all get `secret`. Ports are picked (free on
    loopback) when the object is made, unless given, and kept across stop()/start().
    component_modules: modules enabled on every component (e.g. "causeway_guard": contrib/prosody's
    modules are copied to the instance's plugins/ directory, its plugin_paths); component_config:
    more lines for every component's section (e.g. causeway_guard_max_bytes = N)."""

    def __init__(self, directory, host="xmpp.test", components=None, secret="component-secret",
                 c2s_port=None, component_port=None, log_level="debug", console_level="info",
                 modules=(), extra_config="", start_timeout=20.0, component_modules=(), component_config=""):
        self.base_dir = os.path.abspath(str(directory))
        self.host = host
        self.address = "127.0.0.1"
        if components is None:
            components = {"gk." + host: secret}
        elif not isinstance(components, dict):
            components = {name: secret for name in components}
        self.components = dict(components)
        self.component_names = list(self.components)
        self.secret = next(iter(self.components.values()), secret)
        self.c2s_port = c2s_port or _free_port()
        self.component_port = component_port or _free_port()
        self.log_level = log_level
        self.console_level = console_level
        self.modules = list(modules)
        self.extra_config = extra_config
        self.component_modules = list(component_modules)
        self.component_config = component_config
        self.start_timeout = start_timeout
        self.users = {}             # user -> password, as registered through this object
        self.proc = None
        self._as_root = os.geteuid() == 0
        os.makedirs(self.base_dir, exist_ok=True)
        self._private_dir = None
        if self._as_root and not self._reachable_by_prosody(self.base_dir):
            self._private_dir = tempfile.mkdtemp(prefix="causeway-prosody-", dir="/tmp")
            self.dir = self._private_dir
            try:
                os.symlink(self.dir, os.path.join(self.base_dir, "run"))
            except OSError:
                pass
        else:
            self.dir = self.base_dir
        self.config_path = os.path.join(self.dir, "prosody.cfg.lua")
        self.data_path = os.path.join(self.dir, "data")
        self.pidfile = os.path.join(self.dir, "prosody.pid")
        self.log_path = os.path.join(self.dir, "prosody.log")
        self.plugins_path = os.path.join(self.dir, "plugins")
        for d in (self.data_path, os.path.join(self.dir, "certs"), self.plugins_path):
            os.makedirs(d, exist_ok=True)
        for name in os.listdir(CONTRIB_PROSODY) if os.path.isdir(CONTRIB_PROSODY) else ():
            if name.startswith("mod_") and name.endswith(".lua"):
                shutil.copy(os.path.join(CONTRIB_PROSODY, name), self.plugins_path)
        self.write_config()
        _LIVE.add(self)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _reachable_by_prosody(path):
        try:
            uid = pwd.getpwnam(PROSODY_USER).pw_uid
        except KeyError:
            return True
        p = path
        while True:
            st = os.stat(p)
            if st.st_uid != uid and not st.st_mode & 0o001:
                return False
            parent = os.path.dirname(p)
            if parent == p:
                return True
            p = parent

    def write_config(self):
        """(Re)writes the configuration file from the attributes."""
        modules = ["roster", "saslauth", "disco", "ping", "blocklist", "carbons", "version"]
        modules += [m for m in self.modules if m not in modules]
        lines = [
            "-- Written by tests/integration/prosody.py",
            "daemonize = false",
            f"pidfile = {_lua(self.pidfile)}",
            f"data_path = {_lua(self.data_path)}",
            f"certificates = {_lua(os.path.join(self.dir, 'certs'))}",
            "log = {",
            f"  {{ levels = {{ min = {_lua(self.log_level)} }}, to = \"file\", filename = {_lua(self.log_path)} }};",
        ]
        if self.console_level:
            lines.append(f"  {{ levels = {{ min = {_lua(self.console_level)} }}, to = \"console\" }};")
        lines += [
            "}",
            'interfaces = { "127.0.0.1" }',
            'local_interfaces = { "127.0.0.1" }',
            f"c2s_ports = {{ {self.c2s_port} }}",
            'c2s_interfaces = { "127.0.0.1" }',
            "c2s_direct_tls_ports = { }",
            "legacy_ssl_ports = { }",
            f"component_ports = {{ {self.component_port} }}",
            'component_interfaces = { "127.0.0.1" }',
            "modules_enabled = { " + "; ".join(_lua(m) for m in modules) + " }",
            # No s2s (it would listen on 5269), and nothing that opens HTTP ports.
            'modules_disabled = { "s2s"; "s2s_auth_certs"; "s2s_bidi"; "dialback"; "tls"; "http" }',
            'authentication = "internal_plain"',
            'storage = "internal"',
            "c2s_require_encryption = false",
            "s2s_require_encryption = false",
            "allow_unencrypted_plain_auth = true",
            "allow_registration = false",
            f"plugin_paths = {{ {_lua(self.plugins_path)} }}",
            "",
            self.extra_config,
            "",
            f"VirtualHost {_lua(self.host)}",
        ]
        for name, secret in self.components.items():
            lines += ["", f"Component {_lua(name)}", f"  component_secret = {_lua(secret)}"]
            if self.component_modules:
                lines.append("  modules_enabled = { " + "; ".join(_lua(m) for m in self.component_modules) + " }")
            if self.component_config:
                lines.append(self.component_config)
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._chown()

    def _chown(self):
        if not self._as_root:
            return
        pw = pwd.getpwnam(PROSODY_USER)
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        for root, dirs, files in os.walk(self.dir):
            for n in dirs + files:
                try:
                    os.chown(os.path.join(root, n), pw.pw_uid, pw.pw_gid, follow_symlinks=False)
                except FileNotFoundError:
                    pass

    def _cmd(self, *argv):
        """argv run as the prosody user when we are root."""
        if self._as_root:
            return ["setpriv", "--reuid=" + PROSODY_USER, "--regid=" + PROSODY_USER, "--init-groups",
                    "--pdeathsig=KILL", "--"] + list(argv)
        return list(argv)

    # ------------------------------------------------------------------ users
    def prosodyctl(self, *args, check=True, timeout=30):
        """prosodyctl --config <ours> args...; returns the CompletedProcess (raises on failure if check)."""
        r = subprocess.run(self._cmd(PROSODYCTL, "--config", self.config_path, *args), capture_output=True,
                           text=True, timeout=timeout, cwd=self.dir,
                           preexec_fn=None if self._as_root else _pdeathsig_kill)
        if check and r.returncode != 0:
            raise RuntimeError(f"prosodyctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def register(self, user, password):
        """Creates (or re-passwords) user@host; works whether Prosody runs or not. Returns the bare JID."""
        self.prosodyctl("register", user, self.host, password)
        self.users[user] = password
        return self.jid(user)

    adduser = register

    def unregister(self, user):
        self.prosodyctl("deluser", self.jid(user))
        self.users.pop(user, None)

    def jid(self, user):
        return f"{user}@{self.host}"

    def client(self, user, password=None, connect=True, **kw):
        """An XmppClient for user@host (password: as registered), connected unless connect=False."""
        c = XmppClient(self.jid(user), password if password is not None else self.users[user],
                       host=self.address, port=self.c2s_port, **kw)
        return c.connect() if connect else c

    # ------------------------------------------------------------------ process
    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid if self.running else None

    def start(self, timeout=None):
        """Starts Prosody and waits until the c2s and component ports accept connections."""
        if self.running:
            return self
        timeout = timeout or self.start_timeout
        self._chown()
        self._log_start = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        for port in (self.c2s_port, self.component_port):
            if _port_open(port):
                raise RuntimeError(f"port {port} is already in use; Prosody cannot start on it")
        self.proc = subprocess.Popen(self._cmd(PROSODY, "--config", self.config_path, "-F"), cwd=self.dir,
                                     stdin=subprocess.DEVNULL,
                                     preexec_fn=None if self._as_root else _pdeathsig_kill)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"prosody exited ({rc}) while starting; log:\n{self.log(since_start=True)}")
            log = self.log(since_start=True)
            if "Failed to open server port" in log:
                self.kill()
                raise RuntimeError(f"prosody could not listen; log:\n{log}")
            if self._listening(log):
                return self
            if time.time() > deadline:
                self.kill()
                raise RuntimeError(f"prosody not listening after {timeout}s; log:\n{log}")
            time.sleep(0.02)

    def _listening(self, log):
        """Both listeners are bound: seen in the log (no stray connection in it), or else by connecting."""
        if self.log_level in ("debug", "info"):
            return all(f"Activated service '{name}' on [127.0.0.1]:{port}" in log
                       for name, port in (("c2s", self.c2s_port), ("component", self.component_port)))
        return _port_open(self.c2s_port) and _port_open(self.component_port)

    def stop(self, timeout=10.0):
        """SIGTERM (Prosody closes its streams with system-shutdown) and wait, SIGKILL after timeout.
        Returns the exit code (None when it was not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        rc = self.proc.returncode
        self.proc = None
        self._save_log()
        return rc

    def kill(self):
        """SIGKILL: a crash, no stream is closed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        rc = self.proc.returncode
        self.proc = None
        self._save_log()
        return rc

    def restart(self, timeout=None):
        """stop() then start(): same ports, same data (users, rosters, offline messages)."""
        self.stop()
        return self.start(timeout)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def close(self):
        """Stops Prosody and removes the private directory under /tmp, if one was used (its log is
        copied to the requested directory first)."""
        self.stop()
        if self._private_dir:
            self._save_log()
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
        _LIVE.discard(self)

    def _save_log(self):
        if self._private_dir and os.path.exists(self.log_path):
            try:
                shutil.copyfile(self.log_path, os.path.join(self.base_dir, "prosody.log"))
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ log
    def log(self, since_start=False):
        """The log file's text (of every run; of the current run only if since_start)."""
        path = self.log_path
        if not os.path.exists(path) and os.path.exists(os.path.join(self.base_dir, "prosody.log")):
            path = os.path.join(self.base_dir, "prosody.log")  # the copy close() kept
        try:
            with open(path, "rb") as f:
                if since_start:
                    f.seek(getattr(self, "_log_start", 0))
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern, timeout=10, since_start=True):
        """The first match of the regular expression in the log, waiting for it."""
        deadline = time.time() + timeout
        while True:
            m = re.search(pattern, self.log(since_start))
            if m:
                return m
            if time.time() > deadline:
                raise AssertionError(f"no {pattern!r} in the Prosody log in {timeout}s:\n"
                                     + self.log(since_start)[-5000:])
            time.sleep(0.05)


def _kill_all():
    for p in list(_LIVE):
        try:
            p.kill()
            p.close()
        except Exception:
            pass


atexit.register(_kill_all)


# ---------------------------------------------------------------------- stanzas
class Stanza(ET.Element):
    """A received stanza: an ElementTree element plus its XML text (.xml). Always true (not len-based)."""
    xml = None

    def __bool__(self):
        return True

    @property
    def ns(self):
        """The stanza's namespace (jabber:client, or jabber:component:accept on a component stream)."""
        return self.tag[1:].split("}", 1)[0] if self.tag.startswith("{") else ""

    @property
    def body(self):
        """The text of the <body/> (in the stanza's namespace), or None without one."""
        b = self.find("{%s}body" % self.ns)
        return (b.text or "") if b is not None else None

    @property
    def error_condition(self):
        """The defined condition of a type='error' stanza (e.g. 'service-unavailable'), or None."""
        for err in self:
            if err.tag.endswith("}error"):
                for c in err:
                    if c.tag.startswith("{%s}" % NS_STANZAS) and not c.tag.endswith("}text"):
                        return c.tag.split("}", 1)[1]
                    if c.tag.startswith("{%s}" % NS_STREAMS) and not c.tag.endswith("}text"):
                        return c.tag.split("}", 1)[1]
        if self.tag == "{%s}error" % NS_STREAM:
            for c in self:
                if not c.tag.endswith("}text"):
                    return c.tag.split("}", 1)[1]
        return None

    def __repr__(self):
        return f"<Stanza {self.xml}>"


def parse_stanza(text):
    """XML text -> Stanza (with .xml = text)."""
    parser = ET.XMLParser(target=ET.TreeBuilder(element_factory=Stanza))
    parser.feed(text)
    el = parser.close()
    el.xml = text
    return el


def _local(tag):
    return tag.split("}", 1)[-1]


class XmppError(Exception):
    """Connection or login failure, or an iq error that was not expected (.stanza holds it)."""

    def __init__(self, msg, stanza=None):
        super().__init__(msg)
        self.stanza = stanza


# ---------------------------------------------------------------------- the c2s client
class XmppClient:
    """A real client (slixmpp) for a local user, logging in like a phone would: plain TCP, no STARTTLS,
    SASL (SCRAM or PLAIN), resource binding, roster fetch, initial presence (which makes Prosody hand
    over offline messages). Its asyncio loop runs in a thread of its own; everything here is synchronous
    and thread-safe.

    Nothing is answered automatically except what any client answers (iq errors for unknown queries,
    disco#info, ping); subscription requests are left to the test (no auto-authorize), no receipts are
    sent."""

    def __init__(self, jid, password, host="127.0.0.1", port=5222, resource=None, timeout=10.0,
                 plugins=("xep_0030", "xep_0199"), initial_presence=True, fetch_roster=True, priority=0,
                 sasl_mech=None):
        self.requested_jid = jid if resource is None else f"{jid.split('/')[0]}/{resource}"
        self.password = password
        self.host = host
        self.port = port
        self.timeout = timeout
        self.plugins = tuple(plugins)
        self.initial_presence = initial_presence
        self.fetch_roster = fetch_roster
        self.priority = priority
        self.sasl_mech = sasl_mech   # e.g. "PLAIN"; None: the best offered (SCRAM-SHA-256 with Prosody 0.12)
        self.jid = None             # the full JID bound, once online
        self._cond = threading.Condition()
        self._stanzas = []          # every top-level element received (all connections), in order
        self._thread = None
        self._loop = None
        self._xmpp = None
        self._state = "offline"     # offline, connecting, online, failed
        self._failure = None
        self.disconnects = []       # reasons of the disconnections seen

    @property
    def bare(self):
        return self.requested_jid.split("/")[0]

    # ------------------------------------------------------------------ lifecycle
    def connect(self, timeout=None, wait=True):
        """Connects and logs in; with wait, returns once online (raises XmppError on failure)."""
        if self._thread is not None:
            if self._state == "online":
                raise XmppError("already connected")
            self._shutdown_loop()  # a stream the server ended: connect anew
        self._state, self._failure = "connecting", None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True,
                                        name=f"xmpp-{self.requested_jid}")
        self._thread.start()
        started.wait(10)
        if wait:
            self.wait_online(timeout)
        return self

    def wait_online(self, timeout=None):
        timeout = timeout or self.timeout
        with self._cond:
            self._cond.wait_for(lambda: self._state in ("online", "failed"), timeout)
            state = self._state
        if state != "online":
            reason = self._failure or f"not online after {timeout}s"
            self._shutdown_loop()
            raise XmppError(f"{self.requested_jid}: {reason}")
        return self

    @property
    def online(self):
        return self._state == "online"

    def wait_offline(self, timeout=None):
        """Waits until the stream is gone (the server closed it, or Prosody stopped)."""
        timeout = timeout or self.timeout
        with self._cond:
            if not self._cond.wait_for(lambda: self._state != "online", timeout):
                raise AssertionError(f"{self.requested_jid}: still online after {timeout}s")
        return self

    def _run(self, started):
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            self._xmpp = _SliClient(self)
            self._xmpp.connect((self.host, self.port), use_ssl=False, force_starttls=False,
                               disable_starttls=True)
        except Exception as ex:  # pragma: no cover
            self._set_state("failed", f"connect: {ex!r}")
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def _set_state(self, state, failure=None):
        with self._cond:
            if self._state == "online" and state == "failed":
                state = "offline"
            self._state = state
            if failure and not self._failure:
                self._failure = failure
            self._cond.notify_all()

    def _call(self, fn, *args, timeout=None):
        """Runs fn(*args) in the loop's thread and returns its result (awaited if a coroutine)."""
        if self._loop is None or self._loop.is_closed():
            raise XmppError("not connected")

        async def run():
            r = fn(*args)
            if asyncio.iscoroutine(r) or isinstance(r, asyncio.Future):
                r = await r
            return r
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout or self.timeout)

    def disconnect(self, timeout=5.0):
        """Closes the stream (the server goes offline for this resource) and ends the thread."""
        if self._thread is None:
            return
        try:
            if self._xmpp is not None and self._xmpp.transport is not None:
                self._call(lambda: self._xmpp.disconnect(wait=timeout), timeout=timeout + 2)
        except Exception:
            pass
        self._shutdown_loop()

    def abort(self):
        """Drops the TCP connection without closing the stream (a phone losing its network)."""
        if self._thread is None:
            return
        try:
            self._call(self._xmpp.abort, timeout=5)
        except Exception:
            pass
        self._shutdown_loop()

    def _shutdown_loop(self):
        loop, thread, xmpp = self._loop, self._thread, self._xmpp

        def stop():
            # No socket outlives the loop: Prosody would keep the session (and wait for it at shutdown).
            if xmpp is not None and xmpp.transport is not None:
                xmpp.cancel_connection_attempt()
                xmpp.transport.abort()  # closes the socket in a callback it schedules: stop after it
            loop.call_soon(loop.stop)
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop)
            except RuntimeError:
                pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)
        self._thread = None
        self._loop = None
        self._xmpp = None
        with self._cond:
            if self._state != "failed":
                self._state = "offline"
            self._cond.notify_all()

    def __enter__(self):
        return self if self._thread else self.connect()

    def __exit__(self, *exc):
        self.disconnect()

    # ------------------------------------------------------------------ sending
    def send_raw(self, xml):
        """Sends XML text as it is (a stanza the test wrote, hostile or not), after anything sent before."""
        if self._state not in ("online", "connecting") or self._xmpp is None:
            raise XmppError(f"{self.requested_jid}: not connected ({self._failure or self._state})")
        self._call(self._xmpp.send, xml)
        if len(xml) > 8192:
            # Debian's expat (2.5.0-1+deb12u2 on, CVE-2023-52425's fix),
            # which Prosody and ejabberd parse with, defers reparsing a
            # token until the bytes after it double what it had: a long
            # start tag that came in two reads, with nothing after it,
            # waited in the server for ever (seen on the thirty-second
            # session's machine). Whitespace between stanzas, a client's
            # keepalive, releases it, as a real client's next bytes do.
            self._call(self._xmpp.send, " " * (2 * len(xml)))

    def send_message(self, to, body=None, mtype="chat", id=None, payload="", origin_id=True,
                     receipt=False, markable=False, thread=None, lang=None):
        """A <message/> with a body (if not None), an origin-id equal to its id (unless origin_id=False),
        optionally a receipt request (XEP-0184), a markable (XEP-0333), a thread, and payload: more XML
        text (str or list of str) put in as is. Returns the id."""
        sid = id or uuid.uuid4().hex
        attrs = f"to={quoteattr(to)} id={quoteattr(sid)}"
        if mtype:
            attrs += f" type={quoteattr(mtype)}"
        if lang:
            attrs += f" xml:lang={quoteattr(lang)}"
        inner = ""
        if body is not None:
            inner += f"<body>{escape(body)}</body>"
        if thread:
            inner += f"<thread>{escape(thread)}</thread>"
        if receipt:
            inner += "<request xmlns='urn:xmpp:receipts'/>"
        if markable:
            inner += "<markable xmlns='urn:xmpp:chat-markers:0'/>"
        if origin_id:
            inner += f"<origin-id xmlns='{NS_SID}' id={quoteattr(sid)}/>"
        inner += "".join(payload) if isinstance(payload, (list, tuple)) else (payload or "")
        self.send_raw(f"<message {attrs}>{inner}</message>")
        return sid

    def send_presence(self, to=None, ptype=None, show=None, status=None, priority=None, payload=""):
        """A <presence/>: to=None for a broadcast; ptype: subscribe, subscribed, unsubscribe, unsubscribed,
        unavailable, probe, or None (available)."""
        attrs = ""
        if to:
            attrs += f" to={quoteattr(to)}"
        if ptype:
            attrs += f" type={quoteattr(ptype)}"
        inner = ""
        if show:
            inner += f"<show>{escape(show)}</show>"
        if status is not None:
            inner += f"<status>{escape(status)}</status>"
        if priority is not None:
            inner += f"<priority>{int(priority)}</priority>"
        inner += payload or ""
        self.send_raw(f"<presence{attrs}>{inner}</presence>" if inner else f"<presence{attrs}/>")

    def iq(self, itype, to, payload=None, timeout=None, expect_error=False, id=None):
        """Sends an <iq type=itype to=to> holding payload (XML text, or None) and returns the answer (a
        Stanza of the whole <iq/>). A type='error' answer raises XmppError unless expect_error; with
        expect_error=True a 'result' answer raises instead; expect_error=None takes either."""
        iid = id or uuid.uuid4().hex
        to_attr = f" to={quoteattr(to)}" if to else ""
        start = self.count()
        self.send_raw(f"<iq type={quoteattr(itype)} id={quoteattr(iid)}{to_attr}>{payload or ''}</iq>")
        ans = self.wait_for_stanza(lambda el: el.tag == "{%s}iq" % NS_CLIENT and el.get("id") == iid
                                   and el.get("type") in ("result", "error"),
                                   timeout=timeout, start=start, what=f"an answer to iq {iid} ({to})")
        if ans.get("type") == "error" and expect_error is False:
            raise XmppError(f"iq to {to} failed: {ans.xml}", ans)
        if ans.get("type") == "result" and expect_error is True:
            raise XmppError(f"iq to {to} succeeded, an error was expected: {ans.xml}", ans)
        return ans

    def ping(self, to, timeout=None):
        """XEP-0199; True on a result, False on an error."""
        return self.iq("get", to, "<ping xmlns='urn:xmpp:ping'/>", timeout=timeout,
                       expect_error=None).get("type") == "result"

    def disco_info(self, to, node=None, timeout=None):
        """(identities as (category, type, name) tuples, feature vars as a set)."""
        n = f" node={quoteattr(node)}" if node else ""
        ans = self.iq("get", to, f"<query xmlns='http://jabber.org/protocol/disco#info'{n}/>", timeout=timeout)
        ns = "{http://jabber.org/protocol/disco#info}"
        return ([(i.get("category"), i.get("type"), i.get("name")) for i in ans.iter(ns + "identity")],
                {f.get("var") for f in ans.iter(ns + "feature")})

    def roster(self, timeout=None):
        """The server's roster: {bare jid: {"subscription", "ask", "name", "groups"}}."""
        ans = self.iq("get", None, f"<query xmlns='{NS_ROSTER}'/>", timeout=timeout)
        out = {}
        for item in ans.iter("{%s}item" % NS_ROSTER):
            out[item.get("jid")] = {"subscription": item.get("subscription", "none"), "ask": item.get("ask"),
                                    "name": item.get("name"),
                                    "groups": [g.text for g in item.findall("{%s}group" % NS_ROSTER)]}
        return out

    def roster_remove(self, jid, timeout=None):
        self.iq("set", None, f"<query xmlns='{NS_ROSTER}'><item jid={quoteattr(jid)} subscription='remove'/>"
                             "</query>", timeout=timeout)

    # ------------------------------------------------------------------ receiving
    def _received(self, el):
        text = _tostring(el)
        try:
            st = parse_stanza(text)
        except ET.ParseError:  # pragma: no cover
            return
        with self._cond:
            self._stanzas.append(st)
            self._cond.notify_all()

    def count(self):
        """How many top-level elements were received so far (an index for start=)."""
        with self._cond:
            return len(self._stanzas)

    def stanzas(self, kind=None):
        """Everything received (kind: 'message', 'presence', 'iq', or None for all, stream errors too)."""
        with self._cond:
            return [s for s in self._stanzas if kind is None or s.tag == "{%s}%s" % (NS_CLIENT, kind)]

    def messages(self):
        return self.stanzas("message")

    def presences(self):
        return self.stanzas("presence")

    def iqs(self):
        return self.stanzas("iq")

    def clear(self):
        with self._cond:
            self._stanzas.clear()

    def wait_for_stanza(self, pred=None, timeout=None, start=0, what="a stanza"):
        """The first element received at index start or later that satisfies pred (AssertionError after
        timeout)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.time() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self._stanzas):
                    if pred is None or pred(self._stanzas[i]):
                        return self._stanzas[i]
                    i += 1
                left = deadline - time.time()
                if left <= 0:
                    got = "\n".join(s.xml for s in self._stanzas[start:][-30:])
                    raise AssertionError(f"{self.requested_jid}: no {what} in {timeout}s; received:\n{got}")
                self._cond.wait(left)

    def _kind(self, kind, pred):
        tag = "{%s}%s" % (NS_CLIENT, kind)
        return lambda el: el.tag == tag and (pred is None or pred(el))

    def wait_for_message(self, pred=None, timeout=None, start=0):
        return self.wait_for_stanza(self._kind("message", pred), timeout, start, "such message")

    def wait_for_presence(self, pred=None, timeout=None, start=0):
        return self.wait_for_stanza(self._kind("presence", pred), timeout, start, "such presence")

    def wait_for_iq(self, pred=None, timeout=None, start=0):
        return self.wait_for_stanza(self._kind("iq", pred), timeout, start, "such iq")

    def wait_for(self, pred=None, timeout=None, start=0):
        """(XML text, element) of the first message matching pred."""
        el = self.wait_for_message(pred, timeout, start)
        return el.xml, el

    def expect_no_message(self, pred=None, wait=0.5, start=0):
        """Asserts that no message matching pred is received (at index start or later) within wait seconds."""
        time.sleep(wait)
        with self._cond:
            hits = [m.xml for m in self._stanzas[start:]
                    if m.tag == "{%s}message" % NS_CLIENT and (pred is None or pred(m))]
        assert not hits, f"{self.requested_jid}: unexpected message(s): {hits}"


_XML_NS = "http://www.w3.org/XML/1998/namespace"


def _split(tag):
    return tag[1:].split("}", 1) if tag.startswith("{") else ("", tag)


def _esc(s, attr=False):
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")
    if attr:
        s = s.replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")
    return s


def _tostring(el, parent_ns=None):
    """An element as XML text: default namespace declarations where the namespace changes (as on the wire),
    prefixes only for namespaced attributes (which slixmpp's own serializer drops)."""
    ns, local = _split(el.tag)
    attrs = [("xmlns", ns)] if ns != parent_ns else []
    prefixes = {}
    for k, v in el.attrib.items():
        if k.startswith("{"):
            ans, alocal = _split(k)
            if ans == _XML_NS:
                attrs.append(("xml:" + alocal, v))
                continue
            if ans not in prefixes:
                prefixes[ans] = f"ns{len(prefixes)}"
                attrs.append((f"xmlns:{prefixes[ans]}", ans))
            attrs.append((f"{prefixes[ans]}:{alocal}", v))
        else:
            attrs.append((k, v))
    out = "<" + local + "".join(f' {k}="{_esc(v, True)}"' for k, v in attrs)
    inner = _esc(el.text) if el.text else ""
    for child in el:
        inner += _tostring(child, ns)
        if child.tail:
            inner += _esc(child.tail)
    return out + (f">{inner}</{local}>" if inner else "/>")


def _make_sli_class():
    import slixmpp

    class SliClient(slixmpp.ClientXMPP):
        def __init__(self, owner):
            super().__init__(owner.requested_jid, owner.password,
                             plugin_config={"feature_mechanisms": {"unencrypted_plain": True}},
                             sasl_mech=owner.sasl_mech)
            self.owner = owner
            self.auto_authorize = None   # subscription requests are the test's business
            self.auto_subscribe = False
            for p in owner.plugins:
                self.register_plugin(p)
            if "xep_0199" in owner.plugins:
                self["xep_0199"].enable_keepalive = False
            self.add_event_handler("session_start", self._session_start)
            self.add_event_handler("failed_all_auth", lambda *_: self._fail("authentication failed"))
            self.add_event_handler("connection_failed", self._connection_failed)
            self.add_event_handler("stream_error", lambda e: self._fail(f"stream error: {e}"))
            self.add_event_handler("disconnected", self._disconnected)

        def incoming_filter(self, xml):
            if xml.tag != "{%s}features" % NS_STREAM and not xml.tag.startswith(
                    "{urn:ietf:params:xml:ns:xmpp-sasl}"):
                self.owner._received(copy.deepcopy(xml))
            return xml

        async def _session_start(self, _):
            try:
                if self.owner.fetch_roster:
                    await self.get_roster()
                if self.owner.initial_presence:
                    self.send_presence(ppriority=self.owner.priority)
                self.owner.jid = str(self.boundjid.full)
                self.owner._set_state("online")
            except Exception as ex:
                self._fail(f"session start: {ex!r}")

        def _fail(self, why):
            self.owner._set_state("failed", why)

        def _connection_failed(self, err):
            self.cancel_connection_attempt()   # no endless retries
            self._fail(f"connection failed: {err}")

        def _disconnected(self, reason):
            self.owner.disconnects.append(reason)
            self.owner._set_state("failed", f"disconnected: {reason}")

    return SliClient


_SLI = None


def _SliClient(owner):
    global _SLI
    if _SLI is None:
        _SLI = _make_sli_class()
    return _SLI(owner)


# ---------------------------------------------------------------------- a raw XEP-0114 component
class RawComponent:
    """A bare-socket XEP-0114 component connection, for tests of Prosody's side (or to take the
    component's place): open(), handshake(secret), send(xml), wait_for(pred) on received stanzas."""

    def __init__(self, name, port, host="127.0.0.1", timeout=5.0):
        self.name = name
        self.port = port
        self.host = host
        self.timeout = timeout
        self.sock = None
        self.stream_id = None
        self.header = None
        self.stanzas = []          # Stanza elements received after the stream header
        self.closed = False
        self._parser = None
        self._depth = 0

    def open(self):
        """Connects and sends the stream header; returns the stream id Prosody answered with."""
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._parser = ET.XMLPullParser(("start", "end"))
        self.send(f"<stream:stream xmlns='{NS_COMPONENT}' xmlns:stream='{NS_STREAM}' to={quoteattr(self.name)}>")
        deadline = time.time() + self.timeout
        while self.header is None:
            self._read(deadline)
        self.stream_id = self.header.get("id")
        return self.stream_id

    def handshake(self, secret):
        """Sends the handshake; returns the answer: a Stanza <handshake/> on success, the stream error
        (a Stanza, tag {http://etherx.jabber.org/streams}error) on failure."""
        digest = hashlib.sha1((self.stream_id + secret).encode()).hexdigest()
        start = len(self.stanzas)
        self.send(f"<handshake>{digest}</handshake>")
        return self.wait_for(lambda el: _local(el.tag) in ("handshake", "error"), start=start)

    def send(self, xml):
        self.sock.sendall(xml.encode() if isinstance(xml, str) else xml)

    def _read(self, deadline):
        left = deadline - time.time()
        if left <= 0:
            raise AssertionError(f"component {self.name}: nothing (more) in time; got "
                                 f"{[s.xml for s in self.stanzas]}")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        if not data:
            self.closed = True
            raise AssertionError(f"component {self.name}: connection closed; got {[s.xml for s in self.stanzas]}")
        self._parser.feed(data)
        for ev, el in self._parser.read_events():
            if ev == "start":
                if self._depth == 0:
                    self.header = el
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 1:
                    self.stanzas.append(parse_stanza(_tostring(el)))
                    for c in list(self.header):
                        self.header.remove(c)
                elif self._depth == 0:
                    self.closed = True

    def wait_for(self, pred=None, timeout=None, start=0):
        """The first stanza received (index start or later) matching pred, reading on until timeout."""
        deadline = time.time() + (timeout or self.timeout)
        i = start
        while True:
            while i < len(self.stanzas):
                if pred is None or pred(self.stanzas[i]):
                    return self.stanzas[i]
                i += 1
            if self.closed:
                raise AssertionError(f"component {self.name}: stream closed; got {[s.xml for s in self.stanzas]}")
            self._read(deadline)

    def close(self):
        if self.sock:
            try:
                self.sock.sendall(b"</stream:stream>")
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()
