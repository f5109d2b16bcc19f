"""``python -m bench [--quick] [--only SECTION ...]``: see bench/README.md."""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import celery_peer, raw, report, system
from bench.common import RUN_ID, BenchEnv, progress

SECTIONS: dict[str, Callable[[BenchEnv, dict[str, Any]], None]] = {
    "raw": raw.run,
    **system.SECTIONS,
    "celery": celery_peer.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a ~3 min smoke run")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SECTIONS),
        help="run only this section (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    chosen = [name for name in SECTIONS if not args.only or name in args.only]
    results: dict[str, Any] = {
        "run_id": RUN_ID,
        "started_at": datetime.now(UTC).isoformat(),
        "quick": args.quick,
        "sections": chosen,
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        "errors": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="emailsched-bench-") as workdir:
        env = BenchEnv(quick=args.quick, workdir=Path(workdir))
        env.setup()
        try:
            for name in chosen:
                progress(name, "starting")
                section_started = time.monotonic()
                try:
                    SECTIONS[name](env, results)
                except Exception as exc:  # one broken section must not lose the others
                    progress(name, f"FAILED: {exc!r}")
                    results["errors"][name] = traceback.format_exc()
                results.setdefault("section_seconds", {})[name] = time.monotonic() - section_started
        finally:
            env.teardown()
    results["seconds"] = time.monotonic() - started
    results["targets"] = report.targets(results)
    results["ceilings"] = report.ceilings(results)
    path = report.write(results)
    print(report.markdown(results))
    print(f"\nJSON: {path}  ({results['seconds']:.0f} s)")
    progress("done", f"results in {path}")
    return 1 if results["errors"] else 0


def _cpus() -> int:
    import os  # noqa: PLC0415

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
