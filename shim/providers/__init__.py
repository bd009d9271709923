"""One module per upstream API; each only declares what differs (see base.py)."""
