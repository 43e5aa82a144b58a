"""hexiao-fleetd: headquarters' consumer of every store's fleet records (MQTT 5 -> PostgreSQL)."""
