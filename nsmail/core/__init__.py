"""Pure code, run by every nsmail process: no os, socket, time or asyncio imports.

It trusts nothing it is handed: bytes from servers and tenants are parsed with bounds here.
"""
