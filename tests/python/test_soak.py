"""The soak test (scripts/soak.py) in short: two instances of each manager, Celery
dispatch, the local backend and every kind of fault for about a minute, then the
data-safety invariants. `bash scripts/nox.sh -s soak` runs the long version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_soak_under_faults_keeps_every_invariant():
    # Its own temporary dir under /tmp (pytest's are private to us; as root, the soak's
    # PostgreSQL runs as the postgres user), removed by the soak at the end.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--backend", "local",
         "--packages", "120", "--stream-seconds", "45", "--sources", "4", "--fault-every", "2.5",
         "--settle-timeout", "300"],
        capture_output=True, text=True, timeout=900,
    )
    print(proc.stdout[-20000:])
    print(proc.stderr[-5000:], file=sys.stderr)
    figures = proc.stdout[proc.stdout.find("=== soak: closing figures ==="):]
    assert "invariant violations        0" in figures, figures or proc.stdout[-5000:]
    assert proc.returncode == 0
    # Every kind of fault was injected at least once.
    for kind in ("kill-manager", "kill-worker", "restart-redis", "restart-postgres", "kill-job"):
        assert f"{kind} " in figures, (kind, figures)
