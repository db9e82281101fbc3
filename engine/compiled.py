"""The engine's hottest statements, compiled once per dialect and run on the driver's cursor.

SQLAlchemy's execution of a statement (its cache lookup, execution context, events and result
object) costs several times what SQLite spends running it: an event INSERT and a one-row load
took 106-140 µs of CPU together through `Connection.execute`, 32 µs on the cursor. A `Hot`
statement is compiled once per dialect, with the bind and result processors of its types as
the dialect implements them (`Dialect.type_descriptor`, then the type's public
`bind_processor` / `result_processor`), and run on the DBAPI cursor of the caller's SQLAlchemy
connection, inside the caller's transaction. A driver error is raised as SQLAlchemy raises it
(the same `sa.exc.DBAPIError` subclass), and a connection the dialect calls lost is invalidated
first, as SQLAlchemy's own execution does, so that the pool never hands it out again. The
connection's `before_cursor_execute` listeners are called as for any statement, so that what
counts or logs statements sees these as well.

Only plain statements qualify: named bind parameters, none expanding (no IN lists), and plain
named columns when they return rows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.sql.compiler import SQLCompiler

Processor = Callable[[Any], Any] | None
Values = Mapping[str, Any]


class Hot:
    """One statement (or one per dialect name), compiled for each dialect on first use."""

    def __init__(
        self, statement: sa.Executable | Mapping[str, sa.Executable], keys: Iterable[str] = ()
    ) -> None:
        """`keys`: for an INSERT without values, the columns its parameters give."""
        self.statement = statement
        self._keys = list(keys) or None
        self._compiled: dict[str, _Compiled] = {}

    def first(self, conn: sa.Connection, values: Values) -> dict[str, Any] | None:
        """The first row, by column name, with its values as SQLAlchemy would return them."""
        return self._for(conn).first(conn, values)

    def rowcount(self, conn: sa.Connection, values: Values) -> int:
        """How many rows the statement changed."""
        return self._for(conn).rowcount(conn, values)

    def all(self, conn: sa.Connection, values: Values) -> list[dict[str, Any]]:
        """Every row, each by column name."""
        return self._for(conn).all(conn, values)

    def _for(self, conn: sa.Connection) -> _Compiled:
        name = conn.dialect.name
        found = self._compiled.get(name)
        if found is None:
            statement = self.statement
            if isinstance(statement, Mapping):
                statement = statement[name]
            found = self._compiled[name] = _Compiled(statement, conn.dialect, self._keys)
        return found


class _Compiled:
    """A statement compiled for one dialect, with its types' processors."""

    def __init__(
        self, statement: sa.Executable, dialect: sa.Dialect, keys: list[str] | None
    ) -> None:
        element = cast(sa.ClauseElement, statement)
        compiled = cast(SQLCompiler, element.compile(dialect=dialect, column_keys=keys))
        self.sql = compiled.string
        binds = compiled.binds
        self.positional = dialect.positional
        names = list(compiled.positiontup or ()) if self.positional else list(binds)
        if any(binds[name].expanding for name in names):
            raise ValueError(f"a statement with an expanding parameter cannot be hot: {self.sql}")
        escaped: Mapping[str, str] = getattr(compiled, "escaped_bind_names", None) or {}
        self.binds: list[tuple[str, str, Processor]] = [
            (name, escaped.get(name, name), _bind(binds[name].type, dialect)) for name in names
        ]
        self.defaults = {name: binds[name].value for name in names if not binds[name].required}
        self.columns: list[tuple[str, Processor]] = [
            (name, _result(type_, dialect)) for name, type_ in _returned(statement)
        ]
        self.dialect = dialect
        self.error: type[Exception] = dialect.loaded_dbapi.Error

    def parameters(self, values: Values) -> Sequence[Any] | dict[str, Any]:
        """The driver's parameters for `values` (by name), through the types' processors."""
        converted = []
        for name, _key, process in self.binds:
            value = values[name] if name in values else self.defaults[name]
            converted.append(value if process is None else process(value))
        if self.positional:
            return converted
        return {key: value for (_name, key, _p), value in zip(self.binds, converted, strict=True)}

    def first(self, conn: sa.Connection, values: Values) -> dict[str, Any] | None:
        parameters = self.parameters(values)
        cursor = self._cursor(conn, parameters)
        try:
            cursor.execute(self.sql, parameters)
            row = cursor.fetchone()
            if row is not None:
                cursor.fetchall()  # SQLite: the statement runs to its end
        except self.error as exc:
            raise self._raised(conn, exc, parameters) from exc
        finally:
            cursor.close()
        return None if row is None else self._row(row)

    def all(self, conn: sa.Connection, values: Values) -> list[dict[str, Any]]:
        parameters = self.parameters(values)
        cursor = self._cursor(conn, parameters)
        try:
            cursor.execute(self.sql, parameters)
            rows = cursor.fetchall()
        except self.error as exc:
            raise self._raised(conn, exc, parameters) from exc
        finally:
            cursor.close()
        return [self._row(row) for row in rows]

    def _row(self, row: Sequence[Any]) -> dict[str, Any]:
        return {
            name: value if process is None else process(value)
            for (name, process), value in zip(self.columns, row, strict=True)
        }

    def rowcount(self, conn: sa.Connection, values: Values) -> int:
        parameters = self.parameters(values)
        cursor = self._cursor(conn, parameters)
        try:
            cursor.execute(self.sql, parameters)
            return int(cursor.rowcount)
        except self.error as exc:
            raise self._raised(conn, exc, parameters) from exc
        finally:
            cursor.close()

    def _cursor(self, conn: sa.Connection, parameters: Any) -> Any:
        """A driver cursor of `conn`, announced to its `before_cursor_execute` listeners (those
        that count or log statements see these too)."""
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        listeners = conn.dispatch.before_cursor_execute
        if listeners:
            listeners(conn, cursor, self.sql, parameters, None, False)
        return cursor

    def _raised(self, conn: sa.Connection, exc: Any, parameters: Any) -> sa.exc.StatementError:
        """`exc` as SQLAlchemy would raise it; a lost connection is invalidated first."""
        lost = self.dialect.is_disconnect(exc, conn.connection.dbapi_connection, None)
        if lost and not conn.invalidated:
            conn.invalidate(exc)
        raised: sa.exc.StatementError = sa.exc.DBAPIError.instance(
            self.sql,
            parameters,
            exc,
            self.error,
            connection_invalidated=lost,
            dialect=self.dialect,
        )
        return raised


def _returned(statement: sa.Executable) -> list[tuple[str, Any]]:
    """The (name, type) of each column the statement returns (none for a plain write). Read
    off a copy: SQLAlchemy memoizes these collections on the statement, and a statement later
    derived from it (`touch.returning(...)`) would inherit this one's (empty) collection."""
    statement = copy.copy(statement)
    columns: Iterable[Any]
    if isinstance(statement, sa.Select):
        columns = statement.selected_columns
    elif isinstance(statement, sa.UpdateBase):
        columns = statement.exported_columns
    else:
        return []
    return [(str(column.key), column.type) for column in columns]


def _bind(type_: Any, dialect: sa.Dialect) -> Processor:
    processor: Processor = dialect.type_descriptor(type_).bind_processor(dialect)
    return processor


def _result(type_: Any, dialect: sa.Dialect) -> Processor:
    processor: Processor = dialect.type_descriptor(type_).result_processor(dialect, None)
    return processor
