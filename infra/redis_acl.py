"""Redis ACL users per role: what each streamrec process may do, in one place.

``docker-compose.yml`` passes the same rules to redis-server (a test compares them), and
:class:`infra.embedded.EmbeddedRedis` can start with them. The ``default`` user is switched
off: every client logs in with its role's password (``redis://<role>:<password>@host``).

* ``worker``: reads and writes every key under the prefix; no server administration
  (``-@dangerous``: no CONFIG, FLUSHALL, KEYS, DEBUG...) but INFO (Redis's memory and
  evictions, exported as metrics).
* ``serving`` (feed builder, API): reads every key under the prefix; writes only feeds, the
  feed queue, the bandit's show counts and the published item neighbourhoods (and which are
  wanted); runs scripts (each command inside is checked).
* ``frontend``: GET/MGET of feed keys, nothing else.
"""

from __future__ import annotations

ROLES = ("worker", "serving", "frontend")


def role_rules(prefix: str = "sr") -> dict[str, str]:
    """ACL rules (after ``on >password``) of each role for key prefix ``prefix``."""
    return {
        "worker": f"~{prefix}:* +@all -@dangerous +info",
        # one pattern must grant every access a command needs: read-modify-write keys
        # (SPOP, HINCRBY) get ~, write-only ones (SET of a neighbourhood) %W~; a script's
        # keys need both (the feed and the erasure marker its store checks)
        "serving": (f"%R~{prefix}:* ~{prefix}:{{u:*}}:feed ~{prefix}:{{u:*}}:erased "
                    f"%W~{prefix}:{{i:*}}:hood "
                    f"~{prefix}:{{feedq}}:* ~{prefix}:{{bandit}}:shows ~{prefix}:{{hood}}:* "
                    "+@read +@connection +@scripting +set +sadd +spop +hincrby +zadd "
                    "+zremrangebyscore +zremrangebyrank -@dangerous"),
        "frontend": f"%R~{prefix}:{{u:*}}:feed +get +mget +ping +hello +auth",
    }


def user_args(passwords: dict[str, str], prefix: str = "sr") -> list[str]:
    """redis-server command-line arguments creating each role's user (and disabling the
    passwordless default user)."""
    args = ["--user", "default", "off"]
    for role, rules in role_rules(prefix).items():
        args += ["--user", role, "on", f">{passwords[role]}", *rules.split()]
    return args
