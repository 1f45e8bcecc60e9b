"""Write the .env that docker-compose.yaml needs: fresh random secrets, generated here.

docker-compose.yaml gives no secret a default: every variable it reads as ``${NAME:?...}`` is
required. This script finds those names in the compose file and writes each one that the .env
file does not set yet, with a new random value. It never changes a value already in the file,
so rerunning it is safe, and keeping .env keeps the Fernet key that encrypts the metadata
database. On Linux it also records AIRFLOW_UID, unless you are root, so that files under
logs/ stay owned by you. It prints the names it wrote, never the values.

    python3 scripts/compose_env.py                    # .env next to docker-compose.yaml
    python3 scripts/compose_env.py --env-file other.env

Standard library only, so that it runs before the project's virtualenv exists.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ${NAME:?message} (or ${NAME?message}): a variable compose refuses to run without.
_REQUIRED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?[^}]*\}")
_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")


def required_variables(compose_file: Path) -> list[str]:
    """The variables compose_file requires, in the order they first appear."""
    names: list[str] = []
    for name in _REQUIRED.findall(compose_file.read_text()):
        if name not in names:
            names.append(name)
    return names


def fernet_key() -> str:
    """What cryptography's Fernet.generate_key() returns: 32 random bytes, URL-safe base64."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


def new_value(name: str) -> str:
    if "FERNET" in name:
        return fernet_key()
    # Letters, digits, "-" and "_": safe unquoted in .env, in database URLs and in JSON.
    return secrets.token_urlsafe(32)


def assigned_names(env_file: Path) -> set[str]:
    if not env_file.exists():
        return set()
    names = set()
    for line in env_file.read_text().splitlines():
        match = _ASSIGNMENT.match(line)
        if match and not line.lstrip().startswith("#"):
            names.add(match.group(1))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compose-file", type=Path, default=REPO / "docker-compose.yaml")
    parser.add_argument("--env-file", type=Path, default=None,
                        help="the file to write (default: .env next to the compose file)")
    args = parser.parse_args(argv)
    env_file = args.env_file or args.compose_file.resolve().parent / ".env"

    present = assigned_names(env_file)
    wanted = [name for name in required_variables(args.compose_file) if name not in present]
    # Root is left out: the compose file's default (50000, the image's airflow user) applies.
    if sys.platform.startswith("linux") and os.getuid() != 0 and "AIRFLOW_UID" not in present:
        wanted.append("AIRFLOW_UID")
    if not wanted:
        print(f"{env_file}: already sets every variable {args.compose_file.name} requires; nothing written")
        return 0

    lines = [f"{name}={os.getuid() if name == 'AIRFLOW_UID' else new_value(name)}" for name in wanted]
    existing = env_file.read_text() if env_file.exists() else ""
    if not existing:
        lines.insert(0, "# Local secrets for docker-compose.yaml, written by scripts/compose_env.py. Do not commit.")
    elif not existing.endswith("\n"):
        lines.insert(0, "")
    # Appended, so that what the file held stays as it was; created readable by the owner only.
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    verb = "added to" if existing else "wrote"
    print(f"{verb} {env_file}: {', '.join(wanted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
