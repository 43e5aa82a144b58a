"""The store side of the fleet data path: the journal outbox and the MQTT bridge."""
