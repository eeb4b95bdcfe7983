"""Progress bars for long steps (rich), off when output is not a terminal or when asked."""

from __future__ import annotations

from collections.abc import Callable


class progress_bar:
    """``with progress_bar(on, total, "text") as advance: ... advance(1)``; a no-op when ``on`` is False.

    Refreshes only when advanced (no refresh thread): a background thread would compete with latency
    measurements for the CPU.
    """

    def __init__(self, on: bool, total: int, text: str):
        self.on, self.total, self.text = on and total > 0, total, text

    def __enter__(self) -> Callable[[int], None]:
        if not self.on:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), auto_refresh=False, transient=True)
        self.bar.start()
        task = self.bar.add_task(self.text, total=self.total)

        def advance(n: int) -> None:
            self.bar.advance(task, n)
            self.bar.refresh()

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.on:
            self.bar.stop()
