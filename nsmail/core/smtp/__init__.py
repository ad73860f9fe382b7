"""SMTP as a client speaks it, without IO: replies and failures, and the protocol core.

Pure: no os, socket, time or asyncio. The IO shell is `nsmail.tenant.smtp`.
"""

from nsmail.core.smtp.client import (
    Client,
    Delivered,
    Extensions,
    Results,
    State,
    TlsMode,
    parse_extensions,
)
from nsmail.core.smtp.reply import (
    Enhanced,
    Failure,
    Kind,
    Reply,
    ReplyReader,
    Stage,
    refused,
    timed_out,
)

__all__ = [
    "Client",
    "Delivered",
    "Enhanced",
    "Extensions",
    "Failure",
    "Kind",
    "Reply",
    "ReplyReader",
    "Results",
    "Stage",
    "State",
    "TlsMode",
    "parse_extensions",
    "refused",
    "timed_out",
]
