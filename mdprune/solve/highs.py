"""A HiGHS instance that stays quiet (highspy prints its banner to the C-level stdout when constructed), runs on
a chosen number of threads and leaves out the one heuristic that ignores the time limit."""

from __future__ import annotations

import os
import sys
import threading

import highspy

# HiGHS keeps one worker pool per calling thread, sized by the first run; a run asking another size fails unless
# the pool is reset first. The size each thread's pool has, as far as this module knows:
_pool = threading.local()


def new_highs(verbose: bool = False, threads: int = 1) -> highspy.Highs:
    """``highspy.Highs()`` with logging off (and its construction banner swallowed) unless ``verbose``, using
    ``threads`` threads (1: serial and deterministic).

    Feasibility jump is switched off: it runs before the branch and bound without looking at the clock (tens of
    seconds on a DeiT-B-sized MILP), and every path here gives HiGHS a feasible start anyway.
    """
    if verbose:
        h = highspy.Highs()
    else:
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
    h.setOptionValue("threads", int(threads))
    h.setOptionValue("mip_heuristic_run_feasibility_jump", False)
    if getattr(_pool, "threads", None) != int(threads):
        highspy.Highs.resetThreadScheduler(True)  # the next run builds a pool of the asked size
        _pool.threads = int(threads)
    return h
