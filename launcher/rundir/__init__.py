"""The run directory: what is in it (:class:`RunPaths`, the one owner of its file names), where
it is (:func:`run_dir_of`), who writes it (``lock``) and how the launcher writes it (``write``).

This module imports only ``paths``, which imports nothing heavy: the ranks import it freely.
"""

from launcher.rundir.paths import RunPaths, run_dir_of

__all__ = ["RunPaths", "run_dir_of"]
