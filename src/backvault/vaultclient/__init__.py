"""The client side of the vault: its HTTP API and the password key slot it unlocks."""
