"""Which database errors are worth running the transaction again for: ``is_retryable()``.

PostgreSQL aborts a transaction with a serialization failure (SQLSTATE
40001) or a deadlock (40P01) and expects the client to run it again; MySQL
and MariaDB do the same with error 1213 (deadlock) and 1205 (lock wait
timeout), which carry no SQLSTATE of their own. The error reaches the app
wrapped: in SQLAlchemy's ``DBAPIError`` (the driver's error is its
``orig``), in asyncpg's adapter (which chains asyncpg's own), in a
``CommitFailedError``; ``is_retryable()`` looks through all of them.
"""

from __future__ import annotations

__all__ = ["is_retryable"]

# PostgreSQL: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset(("40001", "40P01"))
# MySQL and MariaDB: ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT.
RETRYABLE_MYSQL_ERRORS = frozenset((1213, 1205))


def is_retryable(error: BaseException) -> bool:
    """True if *error*, or an error it wraps, says the transaction may succeed if run again.

    Recognises PostgreSQL's SQLSTATE 40001 and 40P01 (psycopg, psycopg2,
    asyncpg) and MySQL's errors 1213 and 1205 (PyMySQL, aiomysql, asyncmy,
    mysqlclient), through SQLAlchemy's wrappers and the chain of causes.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if _retryable_itself(current):
            return True
        pending += [getattr(current, "orig", None), current.__cause__, current.__context__]
    return False


def _retryable_itself(error: BaseException) -> bool:
    for attribute in ("sqlstate", "pgcode"):
        code = getattr(error, attribute, None)
        if isinstance(code, str) and code in RETRYABLE_SQLSTATES:
            return True
    # A MySQL driver's error: its number in 'errno' (mysql-connector, mariadb), or first in its args (the others).
    number = getattr(error, "errno", None)
    if number is None and error.args:
        number = error.args[0]
    return type(number) is int and number in RETRYABLE_MYSQL_ERRORS and _from_mysql(error)


def _from_mysql(error: BaseException) -> bool:
    """True if *error* comes from a MySQL driver, whose errors start with the error number."""
    module = type(error).__module__.split(".", 1)[0]
    return module in ("pymysql", "aiomysql", "asyncmy", "MySQLdb", "mysql", "mariadb")
