"""What the api, relay and worker share. Nothing here imports a service."""
