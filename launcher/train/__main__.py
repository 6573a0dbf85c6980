"""``python -m launcher.train --config RUN_DIR/config.yaml``: one rank of a run (see entry.py)."""

from launcher.train.entry import run

run()
