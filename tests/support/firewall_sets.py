"""What nsmail's nftables table holds in a lab namespace, read back with `nft -j`."""

from __future__ import annotations

import json

from lab import Lab


def sets(lab: Lab, namespace: str | None = None) -> dict[str, set[str]] | None:
    """The members of each set of the table in `namespace` (the lab's host), or None."""
    listing = lab.run(
        namespace or lab.host, ["nft", "-j", "list", "table", "inet", "nsmail"], check=False
    )
    if listing.returncode != 0:
        return None
    found = {}
    for entry in json.loads(listing.stdout)["nftables"]:
        if "set" in entry:
            found[entry["set"]["name"]] = set(entry["set"].get("elem", []))
    return found
