"""A private ejabberd (Debian's 23.01) for the tests: its own configuration,
spool and logs in a directory of its own under /tmp, loopback ports picked
when the object is made, its own Erlang node name, run as the ejabberd user
(`ejabberdctl --config-dir ... foreground`) when we are root. Nothing is
written to /etc and the system service is not used. Users are registered
with `ejabberdctl register` against the running node."""
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

from prosody import _free_port, _port_open

EJABBERDCTL = "/usr/sbin/ejabberdctl"
EJABBERD_USER = "ejabberd"


def available():
    return os.path.exists(EJABBERDCTL)


class Ejabberd:
    """components: {name: secret}. host: the one virtual host."""

    def __init__(self, host="ej.test", components=None, start_timeout=60.0):
        self.host = host
        self.components = dict(components or {"gk.example.net": "component-secret"})
        self.c2s_port = _free_port()
        self.component_port = _free_port()
        self.node = f"cwtest{self.component_port}@localhost"
        # A port mapper (epmd) of its own: the tier's workers each run an
        # ejabberd, and one host-wide epmd, killed at one's close (below),
        # took the other's down while it started (a review's finding).
        self.epmd_port = _free_port()
        self.start_timeout = start_timeout
        self.dir = tempfile.mkdtemp(prefix="causeway-ejabberd-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.log_path = os.path.join(self.dir, "log", "ejabberd.log")
        for d in ("db", "log"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        self._as_root = os.geteuid() == 0
        self.proc = None
        self._write_config()

    def _write_config(self):
        lines = [
            f'hosts: ["{self.host}"]',
            "loglevel: info",
            "certfiles: []",
            "listen:",
            f"  - {{port: {self.c2s_port}, ip: \"127.0.0.1\", module: ejabberd_c2s, starttls: false}}",
            f"  - port: {self.component_port}",
            '    ip: "127.0.0.1"',
            "    module: ejabberd_service",
            "    hosts:",
        ]
        for name, secret in self.components.items():
            lines.append(f'      "{name}": {{password: "{secret}"}}')
        lines += [
            "auth_method: internal",
            "acl: {local: {user_regexp: \"\"}}",
            "access_rules: {local: {allow: local}, c2s: {allow: all}}",
            "modules: {mod_roster: {}, mod_disco: {}, mod_ping: {}, mod_offline: {}, mod_version: {}}",
        ]
        with open(os.path.join(self.dir, "ejabberd.yml"), "w") as f:
            f.write("\n".join(lines) + "\n")
        # ejabberdctl reads its own settings from the config dir: an empty file keeps /etc's out.
        open(os.path.join(self.dir, "ejabberdctl.cfg"), "w").close()
        open(os.path.join(self.dir, "inetrc"), "w").close()
        if self._as_root:
            pw = pwd.getpwnam(EJABBERD_USER)
            for root, dirs, files in os.walk(self.dir):
                for n in [root] + [os.path.join(root, x) for x in dirs + files]:
                    os.chown(n, pw.pw_uid, pw.pw_gid)

    def _cmd(self, *args):
        argv = [EJABBERDCTL, "--config-dir", self.dir, "--spool", os.path.join(self.dir, "db"),
                "--logs", os.path.join(self.dir, "log"), "--node", self.node, *args]
        env = ["env", "HOME=" + self.dir, f"ERL_EPMD_PORT={self.epmd_port}"]
        if self._as_root:
            return ["setpriv", "--reuid=" + EJABBERD_USER, "--regid=" + EJABBERD_USER, "--init-groups",
                    "--"] + env + argv
        return env + argv

    def start(self):
        self.proc = subprocess.Popen(self._cmd("foreground"), cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.time() + self.start_timeout
        while not (_port_open(self.c2s_port) and _port_open(self.component_port)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ejabberd exited ({self.proc.returncode}) while starting; log:\n{self.log()}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"ejabberd not listening after {self.start_timeout}s; log:\n{self.log()}")
            time.sleep(0.1)
        return self

    def register(self, user, password):
        # ejabberd opens its ports before its virtual hosts have started: a
        # register right after start may be told "Unknown virtual host", or
        # "Database failure" while its Mnesia tables are still loading (seen
        # once in a clean-clone run on a loaded machine), or an exception
        # {aborted,{no_exists,passwd,storage_type}} while its auth table is
        # not made yet (a clean-clone run of the fifty-ninth session, on a
        # machine at load 2-3: the five set-up errors of test_ejabberd.py
        # were that one).
        deadline = time.time() + self.start_timeout
        while True:
            r = subprocess.run(self._cmd("register", user, self.host, password), capture_output=True, text=True,
                               timeout=60, cwd=self.dir)
            if r.returncode == 0:
                return f"{user}@{self.host}"
            out = r.stdout + r.stderr
            starting = any(w in out for w in ("Unknown virtual host", "Database failure", "no_exists"))
            if not starting or time.time() > deadline:
                raise RuntimeError(f"ejabberdctl register failed: {out}")
            time.sleep(0.2)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-6000:]
        except OSError:
            return "(no log)"

    def stop(self, timeout=20.0):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            subprocess.run(self._cmd("stop"), capture_output=True, timeout=60, cwd=self.dir)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        # Erlang's port mapper outlives the node; it refuses to go while any node lives.
        # This instance's own (ERL_EPMD_PORT): another worker's is left alone.
        epmd = shutil.which("epmd") or "/usr/bin/epmd"
        if os.path.exists(epmd):
            subprocess.run([epmd, "-kill"], capture_output=True, timeout=10,
                           env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)})
