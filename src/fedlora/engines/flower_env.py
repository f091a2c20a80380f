"""Defaults for Flower's process environment, applied before `flwr` is first imported (it reads them then).

fedlora runs federations on private data: Flower's usage telemetry and its update check (both call out to
the internet) are off unless the user set these variables. Imported first by every Flower engine module.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
