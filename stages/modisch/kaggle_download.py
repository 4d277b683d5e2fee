"""Download a Kaggle dataset archive with the official ``kaggle`` client.

Credentials are read by the client itself: ``kaggle.json`` in ``~/.kaggle`` (or in
``$KAGGLE_CONFIG_DIR``), ``KAGGLE_USERNAME`` and ``KAGGLE_KEY``, or ``KAGGLE_API_TOKEN``.
Each expected failure ends in ``SystemExit`` with a message that names the dataset slug and the fix.
"""

import contextlib
import io
import logging
import time
import zipfile
from pathlib import Path

import requests

log = logging.getLogger("fetch")

# Connection failures, stalls past the timeout and truncated bodies. requests wraps the
# urllib3 errors raised while the body streams, so IncompleteRead arrives as
# ChunkedEncodingError.
TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)

CREDENTIALS_HELP = (
    "Put your API key into ~/.kaggle/kaggle.json or $KAGGLE_CONFIG_DIR/kaggle.json, "
    "or set KAGGLE_USERNAME and KAGGLE_KEY, or set KAGGLE_API_TOKEN."
)


class TimeoutAdapter(requests.adapters.HTTPAdapter):
    """HTTP adapter that applies a default timeout to requests sent without one."""

    def __init__(self, timeout_seconds: float):
        super().__init__()
        self.timeout_seconds = timeout_seconds

    def send(self, request, timeout=None, **kwargs):
        if timeout is None:
            timeout = self.timeout_seconds
        return super().send(request, timeout=timeout, **kwargs)


class TransientDownloadError(Exception):
    """A download attempt that failed in a way a later attempt may not."""


def import_kaggle_api():
    """Import ``KaggleApi`` lazily and hide the help text that its package prints.

    Importing any ``kaggle`` module runs ``kaggle/__init__.py``, which authenticates at
    import time and prints help to stdout when no credentials exist (kaggle 2.2.5).
    """
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        from kaggle.api.kaggle_api_extended import KaggleApi
    if captured.getvalue().strip():
        log.debug("kaggle import output: %s", captured.getvalue().strip())
    return KaggleApi


def authenticate(slug: str, source_name: str):
    """Return an authenticated ``KaggleApi``, or exit with where to put credentials."""
    kaggle_api_class = import_kaggle_api()
    api = kaggle_api_class()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            api.authenticate()
    except SystemExit:
        raise SystemExit(
            f"Kaggle dataset {slug}: no valid Kaggle credentials found. The client found none, "
            f"or Kaggle rejected the access token. {CREDENTIALS_HELP} "
            f"To use a local copy instead, set sources.{source_name}.path "
            "in params.yaml to a zip, tar archive or folder."
        ) from None
    return api


def split_slug(slug: str) -> tuple[str, str]:
    """Split ``owner/name`` into its two parts, exiting on any other form."""
    parts = slug.split("/")
    if len(parts) != 2 or not all(parts):
        raise SystemExit(f"Kaggle dataset {slug!r}: expected a slug of the form owner/name.")
    return parts[0], parts[1]


def raise_for_http_error(error: requests.HTTPError, slug: str, source_name: str) -> None:
    """Turn an HTTP error into ``TransientDownloadError`` (5xx, 429) or ``SystemExit``."""
    status = error.response.status_code if error.response is not None else None

    if status is None or status >= 500 or status == 429:
        raise TransientDownloadError(f"HTTP {status}: {error}") from error
    if status in (401, 403):
        raise SystemExit(
            f"Kaggle dataset {slug}: credentials rejected (HTTP {status}). Check that the API "
            f"key is current, and accept the dataset's rules on "
            f"https://www.kaggle.com/datasets/{slug} if it has any. {CREDENTIALS_HELP}"
        ) from None
    if status == 404:
        raise SystemExit(
            f"Kaggle dataset {slug}: not found (HTTP 404). Check sources.{source_name}.kaggle "
            "in params.yaml against the dataset's URL on kaggle.com."
        ) from None
    raise SystemExit(f"Kaggle dataset {slug}: download failed with HTTP {status}: {error}") from None


def download_once(api, slug: str, source_name: str, archive: Path, timeout_seconds: float) -> None:
    """Download the dataset archive into ``archive`` in one attempt, without retries."""
    from kagglesdk.datasets.types.dataset_api_service import ApiDownloadDatasetRequest

    owner_slug, dataset_slug = split_slug(slug)
    request = ApiDownloadDatasetRequest()
    request.owner_slug = owner_slug
    request.dataset_slug = dataset_slug

    try:
        with api.build_kaggle_client() as client:
            http_client = client.http_client()
            # NOTE: kagglesdk 0.1.38 sends every request without a timeout and exposes no
            # setting for one, so the adapter goes onto its private session. The session
            # exists once the client is entered.
            session = getattr(http_client, "_session", None)
            if not isinstance(session, requests.Session):
                raise RuntimeError("kagglesdk no longer keeps a requests.Session in _session")
            adapter = TimeoutAdapter(timeout_seconds)
            session.mount("http://", adapter)
            session.mount("https://", adapter)

            # The API returns a redirect to the archive. requests follows it and returns
            # the open, streamed archive response.
            response = client.datasets.dataset_api_client.download_dataset(request)
            api.download_file(
                response,
                str(archive),
                http_client,
                quiet=True,
                resume=False,
                max_retries=0,
                timeout=timeout_seconds,
            )
    except requests.HTTPError as error:
        raise_for_http_error(error, slug, source_name)
    except TRANSIENT_ERRORS as error:
        raise TransientDownloadError(f"{type(error).__name__}: {error}") from error
    except ValueError as error:
        # download_file raises ValueError when fewer bytes arrive than Content-Length states.
        if "does not match expected size" not in str(error):
            raise
        raise TransientDownloadError(str(error)) from error


def check_zip(archive: Path, slug: str) -> None:
    """Read every entry of ``archive`` and exit if it is not a valid zip."""
    corrupt = (
        f"Kaggle dataset {slug}: the download is corrupt ({archive.name} is not a valid zip "
        "archive). Retry later."
    )
    if not zipfile.is_zipfile(archive):
        raise SystemExit(corrupt)
    try:
        with zipfile.ZipFile(archive) as zf:
            bad_entry = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise SystemExit(f"{corrupt} Error: {error}") from None
    if bad_entry is not None:
        raise SystemExit(f"{corrupt} First entry with a bad CRC: {bad_entry}")


def download_dataset(
    slug: str,
    source_name: str,
    folder: Path,
    *,
    retries: int,
    backoff_seconds: float,
    timeout_seconds: float,
) -> Path:
    """Download ``slug`` into ``folder/<dataset name>.zip``, check it and return its path.

    Transient failures are retried up to ``retries`` times. The wait before retry n
    (counting from 1) is ``backoff_seconds * 2 ** (n - 1)``.
    """
    api = authenticate(slug, source_name)
    archive = folder / f"{split_slug(slug)[1]}.zip"
    attempts = retries + 1

    for attempt in range(1, attempts + 1):
        try:
            download_once(api, slug, source_name, archive, timeout_seconds)
            break
        except TransientDownloadError as error:
            archive.unlink(missing_ok=True)
            # download_file leaves this resume marker next to a partial download.
            archive.with_name(archive.name + ".kaggle-partial").unlink(missing_ok=True)
            if attempt == attempts:
                raise SystemExit(
                    f"Kaggle dataset {slug}: download failed after {attempts} attempts "
                    f"(last error: {error}). Check the network connection and retry later, "
                    f"or raise fetch.retries / fetch.timeout_seconds in params.yaml."
                ) from None
            delay = backoff_seconds * 2 ** (attempt - 1)
            log.warning(
                "Kaggle dataset %s: attempt %d of %d failed (%s); retrying in %.1f s",
                slug, attempt, attempts, error, delay,
            )
            time.sleep(delay)

    check_zip(archive, slug)
    return archive
