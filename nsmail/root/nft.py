"""Apply nftables text (`nsmail.core.firewall`) with the `nft` command, as one transaction.

`nft -f` applies its whole input as one netlink batch that the kernel commits all or
nothing, so a failed script leaves the ruleset as it was. The command comes from
Debian's `nftables` package: the parser and checks an operator meets at the shell, and
errors in their words. Starting it costs about 2 ms.

Security: runs as root in the supervisor, in the network namespace of the calling thread
(`nsmail.root.netns.HostNetwork` enters its own first). The text comes from `nsmail.core.firewall`;
`nft` is found on PATH, which is root's own.
"""

from __future__ import annotations

import subprocess

# A transaction takes milliseconds; a hung nft must not hang the supervisor with it.
NFT_TIMEOUT = 30.0


class NftError(OSError):
    """nft is missing, failed, or refused the text: nothing of it was applied."""


def apply(text: str) -> None:
    """Apply `text` as one transaction, or raise NftError with nft's reason in one line."""
    try:
        done = subprocess.run(
            ["nft", "-f", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise NftError("nft not found: install the nftables package") from None
    except subprocess.TimeoutExpired:
        raise NftError(f"nft gave no answer in {NFT_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        # nft says what is wrong first, then quotes the offending line and marks it.
        reason = next(iter(done.stderr.splitlines()), f"exit status {done.returncode}")
        raise NftError(f"nft: {reason}")
