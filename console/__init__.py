"""skiplock's ops console: a Textual app that reads snapshots from the tables and follows the engine
over LISTEN/NOTIFY. Run it with `console` or `engine console`; see docs/console.md.

Nothing here is imported by `engine/` at module level: a headless container never loads the TUI.
"""
