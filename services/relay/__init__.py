"""The relay: publishes due outbox rows to RabbitMQ on time, marking them published only
after the broker confirmed them. Any number of relays may run on one outbox."""
