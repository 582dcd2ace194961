"""Keyed DataTable updates: change the cells that changed, keep the cursor on the same row.

Rebuilding a table on every refresh flickers and loses the cursor; like Dolphie we update rows by
key inside `batch_update()` and rebuild only when the set or order of rows changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from textual._two_way_dict import TwoWayDict
from textual.widgets import DataTable
from textual.widgets.data_table import RowKey


def sync_rows(table: DataTable[Any], rows: Sequence[tuple[str, Sequence[Any]]]) -> bool:
    """Make `table` show `rows` ([(key, cells)], in order). Returns True when the rows changed.

    Cells that did not change are left alone. When rows come and go (a feed that grows at the top,
    a filter), a `Table` removes the old ones, appends the new ones and reorders: only new rows are
    measured, which is what keeps a 500-row feed cheap. Big changes (more than half the rows gone)
    rebuild, which is then cheaper than removing one by one.
    """
    keys = [key for key, _ in rows]
    current = [str(row.key.value) for row in table.ordered_rows]
    columns = [column.key for column in table.ordered_columns]
    with table.app.batch_update():
        if keys == current:
            _update_cells(table, rows, columns)
            return False
        cursor_key: str | None = None
        if table.row_count and table.is_valid_row_index(table.cursor_row):
            cursor_key = current[table.cursor_row]
        cursor_row = table.cursor_row
        wanted = set(keys)
        gone = [key for key in current if key not in wanted]
        if isinstance(table, Table) and len(gone) * 2 <= len(current):
            for key in gone:
                table.remove_row(key)
            present = set(current) - set(gone)
            _update_cells(table, [(k, c) for k, c in rows if k in present], columns)
            for key, cells in rows:
                if key not in present:
                    table.add_row(*cells, key=key)
            table.reorder(keys)
        else:
            scroll_y = table.scroll_y
            table.clear()
            for key, cells in rows:
                table.add_row(*cells, key=key)
            table.scroll_to(y=scroll_y, animate=False)
        if cursor_key is not None and cursor_key in wanted:
            table.move_cursor(row=keys.index(cursor_key), animate=False, scroll=False)
        elif rows:
            table.move_cursor(row=min(cursor_row, len(rows) - 1), animate=False, scroll=False)
        return True


def _update_cells(table: DataTable[Any], rows: Sequence[tuple[str, Sequence[Any]]], columns: list[Any]) -> None:
    for key, cells in rows:
        old = table.get_row(key)
        for column, old_value, value in zip(columns, old, cells):
            if old_value != value:
                table.update_cell(key, column, value, update_width=True)  # a longer value must not be cropped


class Table(DataTable[Any]):
    """A DataTable whose header keeps up with column widths.

    DataTable measures new rows on idle and widens the columns, but its cell cache key does not change
    then, so a header painted between `add_row` and that idle pass keeps its narrow widths until
    something else invalidates it (seen in snapshot tests). Invalidate once the measuring is done.
    """

    async def _on_idle(self, event: Any) -> None:  # runs before DataTable._on_idle (MRO order)
        if self._require_update_dimensions or self._updated_cells:
            self.call_later(self._widths_changed)

    def _widths_changed(self) -> None:
        self._update_count += 1
        self.refresh()

    def reorder(self, keys: Sequence[str]) -> None:
        """Put the rows in the order of `keys` (all present), as DataTable.sort does, without a sort key
        function (sort's key sees the cells, not the row key)."""
        self._row_locations = TwoWayDict({self._row_key(key): index for index, key in enumerate(keys)})
        self._update_count += 1
        self.refresh()

    def _row_key(self, key: str) -> RowKey:
        return self.rows[RowKey(key)].key
