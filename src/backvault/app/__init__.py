"""The workflows behind the commands (create a repository, manage key slots and the
password, choose the key that opens a repository, apply a retention policy): no click, no
rich; they return dataclasses and raise ``backvault.app.errors``."""
