"""A HiGHS instance that stays quiet: highspy prints its banner to the C-level stdout when constructed."""

from __future__ import annotations

import os
import sys

import highspy


def new_highs(verbose: bool = False) -> highspy.Highs:
    """``highspy.Highs()`` with logging off (and its construction banner swallowed) unless ``verbose``."""
    if verbose:
        return highspy.Highs()
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)
    h.setOptionValue("output_flag", False)
    return h
