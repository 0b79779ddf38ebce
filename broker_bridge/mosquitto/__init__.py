"""The Mosquitto engine: Mosquitto 2 with the dynamic-security plugin.

`engine` (`MosquittoEngine`, the `BrokerEngine` implementation), `config` (mosquitto.conf and the
initial dynamic-security file), `install` (where the broker and its plugin are), `dynsec` (the
commands and roles), `control` (the control topic over a `BrokerLink`), `accounts` (agent accounts:
provision, move, remove).
"""
