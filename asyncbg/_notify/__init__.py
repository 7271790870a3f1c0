"""Outbound notifications: a signed webhook for every job outcome (Notify, the sender, signing)."""
