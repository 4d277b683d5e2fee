"""Change params.yaml values by dotted key, for tests that run stages on edited params."""


def apply_changes(params: dict, changes: dict) -> dict:
    """Set each ``{"train.epochs": 1}``-style entry of ``changes`` in ``params``; return it."""
    for dotted, value in changes.items():
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return params
