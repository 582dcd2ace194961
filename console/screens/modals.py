"""Modal screens: confirm a destructive action, ask for a value, list every key."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static


class ConfirmScreen(ModalScreen[bool]):
    """y / Enter on Yes confirms; n / Escape cancels. Dismisses with True or False."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="skiplock.confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="skiplock.confirm.no"),
    ]

    def __init__(self, title: str, body: str, confirm_label: str = "Yes", danger: bool = True) -> None:
        super().__init__()
        self.title_text = title
        self.body = body
        self.confirm_label = confirm_label
        self.danger = danger

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="confirm"):
            yield Label(self.title_text, id="dialog-title")
            yield Static(self.body, id="dialog-body")
            with Horizontal(id="dialog-buttons"):
                yield Button(f"{self.confirm_label} (y)", id="yes", variant="error" if self.danger else "primary")
                yield Button("Cancel (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # Enter alone never destroys anything

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class PromptScreen(ModalScreen[str | None]):
    """One line of input. Enter submits (the text), Escape cancels (None)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="skiplock.prompt.cancel")]

    def __init__(self, title: str, placeholder: str = "", value: str = "", hint: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.placeholder = placeholder
        self.value = value
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="prompt"):
            yield Label(self.title_text, id="dialog-title")
            yield Input(value=self.value, placeholder=self.placeholder, id="prompt-input")
            if self.hint:
                yield Static(self.hint, id="dialog-hint")

    def on_mount(self) -> None:
        line = self.query_one(Input)
        line.cursor_blink = not getattr(self.app, "fixed_clock", False)  # snapshots: nothing moves
        line.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """Every binding, by screen, with the keys in force (after the keymap)."""

    BINDINGS = [Binding("escape,question_mark,q", "close", "Close", id="skiplock.help.close")]

    def __init__(self, sections: Iterable[tuple[str, list[tuple[str, str]]]], footer: str = "") -> None:
        super().__init__()
        self.sections = list(sections)
        self.footer_text = footer

    def compose(self) -> ComposeResult:
        text = Text()
        width = max((len(keys) for _, rows in self.sections for keys, _ in rows), default=0) + 2
        for title, rows in self.sections:
            text.append(f"{title}\n", style="bold underline")
            for keys, description in rows:
                text.append(f"  {keys:<{width}}", style="bold")  # wide enough for the longest: never run together
                text.append(f"{description}\n")
            text.append("\n")
        if self.footer_text:
            text.append(self.footer_text, style="dim")
        with Vertical(id="dialog", classes="help"):
            yield Label("Keys  (↑ ↓ scroll · Esc closes)", id="dialog-title")
            with VerticalScroll(id="help-body"):
                yield Static(text)

    def action_close(self) -> None:
        self.dismiss(None)
