"""The ``--logger`` factory for twistd: JSON lines on standard output.

``twistd --logger=pyro_reactor.logs.observer pyro-agent ...`` writes one JSON object per event
(``twisted.logger`` format, with the structured fields: action, outcome, duration_ms), for the
journal or a log shipper.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def observer() -> ILogObserver:
    """One JSON event per line on standard output."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
