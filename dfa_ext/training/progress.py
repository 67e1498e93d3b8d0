"""The progress bar and per-epoch report lines of the trainers (main process only)."""

from __future__ import annotations


def progress_bar(enabled: bool, total: int, initial: int = 0, desc: str | None = None):
    """A tqdm bar on stderr, or None when disabled (non-main processes, ``--no-progress``)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def report(line: str, enabled: bool) -> None:
    """Prints a line without breaking a running bar."""
    if enabled:
        from tqdm.auto import tqdm

        tqdm.write(line)
