"""Read ``params.yaml``, the one configuration file of the pipeline."""

from pathlib import Path

import yaml


def load_params(path: str | Path = "params.yaml") -> dict:
    """Load the params file, failing with a message that names it."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: params file not found; run the stage from the project root.")
    with path.open(encoding="utf-8") as f:
        params = yaml.safe_load(f)
    if not isinstance(params, dict):
        raise SystemExit(f"{path}: expected a YAML mapping at the top level.")
    return params


def source_params(params: dict, name: str) -> dict:
    """Return the ``sources.<name>`` entry, failing with the list of known sources."""
    sources = params.get("sources") or {}
    if name not in sources:
        known = ", ".join(sorted(sources)) or "none"
        raise SystemExit(f"params.yaml: no source named {name!r} under 'sources' (known: {known}).")
    return sources[name]
