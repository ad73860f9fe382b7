"""Exit statuses: the one table every nsmail command and child process exits by.

sysexits(3) for what went wrong, so that cron, PHP's mail() and shell scripts can tell a
retry (75) from a mistake (64, 65) and a refusal (77) from a broken configuration (78).
Plain integers, not an IntEnum: `nsmail-sendmail` imports this at every start, and the
enum module would cost it more than its work.
"""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64  # the command was used wrongly: an unknown option, a bad argument
EX_DATAERR = 65  # the input was wrong: a message over its size limit, an unusable key
EX_NOINPUT = 66  # no such message, or none in a state the command applies to
EX_NOUSER = 67  # an address is not deliverable (sendmail -bv)
EX_UNAVAILABLE = 69  # a service is not there: no supervisor, no tenant namespace
EX_SOFTWARE = 70  # a bug, or a child that could not do its part
EX_CANTCREAT = 73  # a file could not be made
EX_TEMPFAIL = 75  # try again later: a full queue or disk, mail in the worker's hands
EX_NOPERM = 77  # not permitted
EX_CONFIG = 78  # the configuration is not valid or cannot be read

# Not sysexits: `nsmail check --dns` found problems (as grep and diff exit 1: "found").
EX_PROBLEMS = 1
# Not sysexits: what shells report of a command (POSIX.1-2017 XCU 2.8.2), as `nsmail exec`
# passes a command's status on.
EX_NOTFOUND = 127  # the command could not be found
SIGNAL_BASE = 128  # a command killed by signal n exits 128 + n
