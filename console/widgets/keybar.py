"""A one-line key bar: what Textual's Footer shows, as one widget of text.

The Footer builds a widget per key and restyles them all whenever the bindings change, which is on
every screen switch: over a hundred milliseconds on these machines, most of a key's latency. This
bar renders the same hints (only `show=True` bindings that check_action allows; dimmed when disabled;
keys after the keymap) as a single Text.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class KeyBar(Static):
    DEFAULT_CSS = """
    KeyBar { dock: bottom; height: 1; background: $panel; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)
        self.update_keys()

    def _bindings_changed(self, screen: object) -> None:
        self.update_keys()

    def update_keys(self) -> None:
        theme = self.app.current_theme
        key_style = f"bold {theme.accent or 'cyan'}"
        text = Text(no_wrap=True, overflow="ellipsis")
        seen: set[tuple[str, str]] = set()
        for active in self.screen.active_bindings.values():
            binding = active.binding
            if not binding.show or (binding.action, binding.description) in seen:
                continue  # "1,o" is one binding per key: show its first key only
            seen.add((binding.action, binding.description))
            if text:
                text.append("  ")
            text.append(self.app.get_key_display(binding), style=key_style if active.enabled else "dim")
            text.append(f" {binding.description}", style="" if active.enabled else "dim")
        text.append("  ")
        text.append("^p", style=key_style)
        text.append(" palette")
        self.update(text)
