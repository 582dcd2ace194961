"""The console's live feed (console.feed.Feed: its one LISTEN connection) alone in a process, so a
test can stop it with SIGSTOP like a console suspended by Ctrl-Z. Prints "connected" on each connect."""

from __future__ import annotations

import asyncio
import sys

from console.feed import Feed
from console.messages import FeedStatus


def _post(message: object) -> None:
    if isinstance(message, FeedStatus) and message.connected:
        print("connected", flush=True)


async def _main(dsn: str) -> None:
    await Feed(dsn, _post, keepalive=1.0).run()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
