"""``outbox.ScanWindow``: where the relay's next claim starts looking."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from services.core.outbox import ScanWindow

NOW = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def test_the_first_claim_scans_everything() -> None:
    assert ScanWindow().floor() is None


def test_a_complete_claim_moves_the_floor_to_its_time_minus_the_margin() -> None:
    window = ScanWindow(margin=timedelta(seconds=2))
    window.scanned(None, NOW, complete=True)
    assert window.floor() == NOW - timedelta(seconds=2)
    window.scanned(window.floor(), NOW + timedelta(seconds=1), complete=True)
    assert window.floor() == NOW - timedelta(seconds=1)


def test_an_incomplete_claim_leaves_the_floor_where_it_was() -> None:
    window = ScanWindow(margin=timedelta(seconds=2))
    window.scanned(None, NOW, complete=True)
    window.scanned(window.floor(), NOW + timedelta(seconds=10), complete=False)
    assert window.floor() == NOW - timedelta(seconds=2)


def test_an_incomplete_full_scan_sets_no_floor() -> None:
    window = ScanWindow()
    window.scanned(None, NOW, complete=False)
    assert window.floor() is None


def test_a_full_scan_comes_round_again() -> None:
    window = ScanWindow(full_scan_seconds=0.05)
    window.scanned(None, NOW, complete=True)
    assert window.floor() is not None
    time.sleep(0.06)
    assert window.floor() is None
