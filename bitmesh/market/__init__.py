"""The marketplace (issue 11): signed offers, state and events over MQTT.

Nothing here is imported while MQTT is off (`mqtt_enabled` 0): the service imports
bitmesh.market.publisher lazily, and bus.py is the only module that imports paho.
"""
