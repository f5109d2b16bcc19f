"""``python -m services.admin`` / ``emailsched-admin``: operator commands.

    emailsched-admin dlq list [--limit N]
    emailsched-admin dlq requeue (--all | --email-id ID)

Settings come from the environment (or ``.env``), as for every other process.
"""

from __future__ import annotations

import argparse
import logging
import sys

import pika.exceptions
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from services.admin import deadletters
from services.core.db import create_db_engine
from services.core.logs import configure_logging
from services.core.settings import Settings

log = logging.getLogger("services.admin")

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emailsched-admin", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="area", required=True)
    dlq = commands.add_parser("dlq", help="the dead-letter queue <EMAIL_QUEUE>.dlq")
    actions = dlq.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="show dead-lettered messages and their emails")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    again = actions.add_parser("requeue", help="move messages back to <EMAIL_QUEUE>")
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every dead-lettered message")
    which.add_argument("--email-id", help="only the messages for this email")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        configure_logging()
        log.error("invalid settings: %s", exc.errors(include_input=False))
        return EXIT_USAGE
    configure_logging("WARNING")
    engine = create_db_engine(settings.database_url.get_secret_value(), pool_size=1)
    try:
        if args.action == "list":
            letters = deadletters.list_dead_letters(settings, engine, limit=args.limit)
            for letter in letters:
                print(letter.line())
            print(f"{len(letters)} message(s) shown from {settings.dlq_name}")
        else:
            moved = deadletters.requeue(settings, email_id=args.email_id)
            for letter in moved:
                print(f"requeued {letter.line()}")
            print(
                f"{len(moved)} message(s) moved from {settings.dlq_name} to {settings.email_queue}"
            )
    except (pika.exceptions.AMQPError, OSError) as exc:
        log.error("RabbitMQ unavailable: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILURE
    except SQLAlchemyError as exc:
        log.error("MySQL unavailable: %s", type(exc).__name__)
        return EXIT_FAILURE
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
