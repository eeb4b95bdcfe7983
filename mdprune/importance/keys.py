"""The keys of a scores mapping beside the dimensions' names: blocks' scores and blocks' shares of shared dims."""

from __future__ import annotations

BLOCK_PREFIX = "block:"
#: prefix of the keys of blocks' shares of shared dimensions in a scores mapping (see :func:`share_key`)
SHARE_PREFIX = "share:"


def block_key(block: str) -> str:
    """The key of a block's score in a scores mapping (beside the dimensions' names)."""
    return BLOCK_PREFIX + block


def share_key(block: str, dim: str) -> str:
    """The key, in a scores mapping, of the part of dimension ``dim``'s scores (an array over its elements, each
    at most the dimension's own score) that comes from removable block ``block``'s own parameters: ``dim`` is
    shared between the block and the rest of the network (the block writes into it), and that part leaves the
    objective when the block is removed (see :func:`mdprune.search.build_problem`)."""
    return f"{SHARE_PREFIX}{block}|{dim}"


def share_parts(key: str) -> tuple[str, str]:
    """(block, dimension) of a :func:`share_key` (block names are module paths: no ``|``)."""
    block, sep, dim = key[len(SHARE_PREFIX):].partition("|")
    if not key.startswith(SHARE_PREFIX) or not sep:
        raise ValueError(f"{key!r} is not a share key")
    return block, dim
