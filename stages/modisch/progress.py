"""Progress bars that stay readable in log files as well as in terminals."""

import sys

from tqdm import tqdm

# Outside a terminal (dvc repro in CI, output piped to a file) a bar redraws as a new
# line each time, so it redraws at most every 30 seconds there.
LOG_INTERVAL_SECONDS = 30.0


def progress(iterable=None, **kwargs) -> tqdm:
    """Return a tqdm bar that updates rarely when stderr is not a terminal."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_SECONDS)
    return tqdm(iterable, **kwargs)
