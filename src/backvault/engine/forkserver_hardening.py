"""Imported first by the fork server worker processes start from (see
``parallel._process_context``), and only there.

The fork server holds no secret, but every worker is a fork of it, and a worker holds
the master key (unpickled with its start-up arguments, before its own start-up code
runs). Left dumpable for the life of the process, another process of the same user could
attach to it (ptrace, /proc/PID/mem) and run code in every worker it forks afterwards.
Not dumpable, it cannot be attached to, and its children are born not dumpable (fork keeps
the flag; only exec resets it)."""

from backvault.hardening import disable_core_dumps

disable_core_dumps()
