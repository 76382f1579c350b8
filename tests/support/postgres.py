"""A real PostgreSQL server for the tests: its own cluster in a temporary folder, stopped at the
end.

initdb and postgres refuse to run as root, so as root (CI) the cluster belongs to the machine's
`postgres` user and every server command runs as that user; otherwise as the current user. The
server listens on a Unix socket in the cluster's folder only (no TCP port), so parallel test runs
and other servers on the machine do not collide.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN_DIRS = (
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/14/bin",
)


@dataclass(frozen=True)
class Server:
    socket_dir: Path
    user: str
    password: str

    def url(self, database: str = "basin", *, with_password: bool = True) -> str:
        """A SQLAlchemy URL for Optuna's RDBStorage, through the psycopg driver and the Unix
        socket."""
        secret = f":{self.password}" if with_password else ""
        return f"postgresql+psycopg://{self.user}{secret}@/{database}?host={self.socket_dir}"

    def create_database(self, name: str) -> str:
        """A new, empty database on this server; returns its URL."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)


def bin_dir() -> Path:
    for folder in BIN_DIRS:
        if (Path(folder) / "initdb").is_file():
            return Path(folder)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError(
        f"no PostgreSQL server binaries (initdb, pg_ctl) in {', '.join(BIN_DIRS)} or on PATH; "
        "install postgresql (15 or later) to run the PostgreSQL tests"
    )


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


@contextmanager
def postgres_server(password: str = "s3cret-pw") -> Iterator[Server]:
    """Start a fresh cluster with a `basin` database and a password-protected superuser `basin`."""
    bins = bin_dir()
    owner = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="basin-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if owner:
        entry = pwd.getpwnam(owner)
        for path in (root, sock):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    pwfile = root / "pw"
    pwfile.write_text(password)
    if owner:
        os.chown(pwfile, pwd.getpwnam(owner).pw_uid, -1)

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(_as_owner(cmd, owner), check=True, capture_output=True, text=True)

    try:
        run(
            [
                str(bins / "initdb"),
                "-D",
                str(data),
                "-U",
                "basin",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        options = (
            f"-c listen_addresses='' -c unix_socket_directories={sock} "
            "-c fsync=off -c max_connections=200"
        )
        run(
            [
                str(bins / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(root / "server.log"),
                "-w",
                "start",
            ]
        )
        env = {**os.environ, "PGPASSWORD": password}
        subprocess.run(
            [str(bins / "createdb"), "-h", str(sock), "-U", "basin", "basin"],
            check=True,
            capture_output=True,
            env=env,
        )
        yield Server(sock, "basin", password)
    except subprocess.CalledProcessError as exc:
        log = (root / "server.log").read_text() if (root / "server.log").is_file() else ""
        raise RuntimeError(
            f"PostgreSQL did not start: {' '.join(exc.cmd)}: {exc.stderr}\n{log[-2000:]}"
        ) from None
    finally:
        subprocess.run(
            _as_owner(
                [str(bins / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], owner
            ),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)
