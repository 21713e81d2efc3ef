"""The bottom layer: settings, IMEI/IMSI/day helpers, the decision engine, logging and the
escaping of untrusted text. Imports nothing else of eir; every other layer may import it."""
