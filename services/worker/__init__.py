"""The worker: takes delivery messages off RabbitMQ, sends the email over SMTP, records
the outcome in MySQL, and only then acks.

- ``worker``: ``Worker.handle(body) -> Decision``, the logic, testable without a broker;
- ``compose``: the RFC 5322 message and its envelope, from an email row;
- ``smtp``: ``SmtpSender``, one reused, verified-TLS SMTP connection;
- ``backoff``: the retry schedule;
- ``__main__``: the process (consume loop, signals, reconnects).
"""
