"""Imported by the fork server of ``essa run`` (a preload module, see :mod:`essa.study`) and called by each cell it
forks: on Linux the process is killed when its parent ends, so a killed study leaves no server or cell running."""

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the process outlives a killed parent
        pass


die_with_parent()
