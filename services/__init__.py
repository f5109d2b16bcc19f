"""emailsched: a transactional-outbox email scheduler.

``api`` writes an email and its outbox row in one MySQL transaction; ``relay`` publishes
due outbox rows to RabbitMQ with publisher confirms; ``worker`` delivers over SMTP.
``core`` is what the three share: settings, schema, unit of work, outbox, broker topology.
"""
