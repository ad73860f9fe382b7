"""Password hashes as Debian's shadow makes them: yescrypt through libxcrypt's crypt(3).

`hash_password` makes a `$y$...` hash with a fresh salt at libxcrypt's default cost (what
`passwd` and `mkpasswd -m yescrypt` write on Debian 11 and later, about 20 ms here);
`verify` checks a password against any hash libxcrypt knows (yescrypt, sha512-crypt
`$6$`, bcrypt `$2b$`...), so hashes an operator brings from elsewhere work too.
Python's `crypt` module is deprecated (PEP 594) and gone in 3.13, so libcrypt is called
through ctypes; `crypt_rn` keeps no state between calls and ctypes releases the GIL
during it, so verifying in a thread does not stop the caller's event loop.

Security: runs as root (`nsmail tenant passwd`) and in the unprivileged submission front,
which loads the library before its chroot (`Crypt()`). Comparison is in constant time;
an unknown user is checked against a dummy hash, so the time does not tell which users
exist.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hmac
import os

_SETTING_SIZE = 256
# libxcrypt's struct crypt_data is 32 KiB and some; crypt_rn checks the size it is given.
_DATA_SIZE = 1 << 16
_YESCRYPT = b"$y$"


class PasswordError(OSError):
    """libcrypt is missing, or refused the hash or the setting."""


class Crypt:
    """libcrypt, loaded once (before a chroot takes it away)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
        try:
            self._lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise PasswordError(f"cannot load libcrypt: {e}") from None
        self._lib.crypt_gensalt_rn.restype = ctypes.c_char_p
        self._lib.crypt_gensalt_rn.argtypes = [
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self._lib.crypt_rn.restype = ctypes.c_char_p
        self._lib.crypt_rn.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        self._dummy = self.hash_password("nsmail: no such user")

    def hash_password(self, password: str) -> str:
        """A yescrypt hash of `password` with a fresh salt, at libxcrypt's default cost."""
        entropy = os.urandom(32)
        setting = ctypes.create_string_buffer(_SETTING_SIZE)
        made = self._lib.crypt_gensalt_rn(
            _YESCRYPT, 0, entropy, len(entropy), setting, _SETTING_SIZE
        )
        if not made:
            raise PasswordError("libcrypt cannot make a yescrypt setting")
        return self._crypt(password, made)

    def verify(self, password: str, hashed: str | None) -> bool:
        """Whether `password` is the one `hashed` was made from (None: no such user, and
        the same work is done, against a dummy)."""
        expected = self._dummy if hashed is None else hashed
        try:
            got = self._crypt(password, expected.encode("ascii"))
        except (PasswordError, UnicodeEncodeError):
            return False
        return hmac.compare_digest(got, expected) and hashed is not None

    def _crypt(self, password: str, setting: bytes) -> str:
        phrase = password.encode("utf-8")
        if b"\0" in phrase:
            raise PasswordError("a password holds no NUL")
        data = ctypes.create_string_buffer(_DATA_SIZE)
        result = self._lib.crypt_rn(phrase, setting, data, _DATA_SIZE)
        # libxcrypt fails with NULL, or a string starting with "*" (never a hash).
        if not result or result.startswith(b"*"):
            raise PasswordError("libcrypt refused the hash")
        return str(result.decode("ascii"))
