"""The chat on the fake engine, to look at in a terminal or to save the README's compare-mode screenshot.

python -m tests.tui_demo                                   # interactive, in a temporary home
python -m tests.tui_demo --screenshot docs/compare-mode.svg
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import numpy as np

from grains_edge.tui.app import ChatApp
from tests.fake_engine import FakeEngine, fake_app

UNSTEERED = (
    "Yes! If you swallow gum it stays in your stomach for **seven years**, because your body can't digest it. "
    "Try not to swallow it!"
)
TRUTHFUL = (
    "No. Gum isn't digested like other food, but it doesn't stay in your stomach: it passes through your "
    "digestive system and leaves the body in a few days, like anything else you can't digest.\n\n"
    "- the *seven years* story is a myth\n"
    "- swallowing a lot at once can, rarely, cause a blockage"
)


def demo_reply(messages: list[dict], steering: np.ndarray | None) -> str:
    """Unsteered: the popular misconception; any steering on layer 1 (truthful): the correct answer."""
    return TRUTHFUL if steering is not None and steering[1].any() else UNSTEERED


def demo_app(home: Path, delay: float = 0.03) -> ChatApp:
    return fake_app(home / "chat.sqlite3", FakeEngine(demo_reply, delay=delay), profile="truthful")[0]


async def screenshot(path: Path) -> None:
    with tempfile.TemporaryDirectory() as home:
        app = demo_app(Path(home), delay=0)
        async with app.run_test(size=(132, 34)) as pilot:
            app.action_toggle_compare()
            app.query_one("#composer").insert("If I swallow gum, does it stay in my stomach for seven years?")
            await pilot.press("enter")
            await app.workers.wait_for_complete()
            await pilot.pause(0.3)
            path.parent.mkdir(parents=True, exist_ok=True)
            app.save_screenshot(path.name, str(path.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", type=Path, help="save an SVG of compare mode here and exit")
    args = parser.parse_args()
    if args.screenshot:
        asyncio.run(screenshot(args.screenshot))
        return
    with tempfile.TemporaryDirectory() as home:
        demo_app(Path(home)).run()


if __name__ == "__main__":
    main()
