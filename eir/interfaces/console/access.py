"""Who may use the web console, and how that is remembered (sans-IO: no HTTP here).

Login: a person pastes a token, the admin API's (`api.token`, $EIR_API_TOKEN: role
"admin") or the read-only one (`api.read_only_token`, $EIR_API_READ_TOKEN: role "read"),
compared in constant time. The session that follows is a cookie holding the role, a CSRF
token and the login time, signed with itsdangerous (HMAC-SHA256, with a key derived by
HMAC-SHA256 from both tokens; `Sessions`): nothing is kept on the server, a
changed or forged cookie is refused, one older than `console.session_seconds` is refused,
and changing either token ends every session at once. itsdangerous (Pallets, the makers of
Flask and Jinja2) rather than our own HMAC framing: it gets the encoding, the timestamp and
the constant-time comparison right and is kept by people who review exactly that.

Every change is a form POST that must carry the session's CSRF token (besides the cookie
being SameSite=Strict): a page on another site cannot make a logged-in browser change rules.

Guessing a token is bounded by `LoginLimiter`: at most `console.max_login_failures` failed
logins per address within `console.login_window_seconds`; beyond, every login from that
address is refused until the window has passed, right token or not.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

ADMIN, READ = "admin", "read"
ROLES = (ADMIN, READ)
SESSION_SALT = "eir.console.session"


@dataclass(frozen=True)
class Session:
    role: str
    csrf: str

    @property
    def may_change(self) -> bool:
        return self.role == ADMIN


def role_of(offered: str, admin_token: str, read_token: str | None) -> str | None:
    """The role `offered` logs in as, or None. Both comparisons always run (constant time,
    whichever token matches)."""
    given = offered.encode()
    is_admin = hmac.compare_digest(given, admin_token.encode())
    is_reader = read_token is not None and hmac.compare_digest(given, read_token.encode())
    return ADMIN if is_admin else READ if is_reader else None


class Sessions:
    """Signed, expiring session cookies (see the module docstring)."""

    def __init__(self, admin_token: str, read_token: str | None, max_age: float):
        key = hmac.new(admin_token.encode(), b"eir console\0" + (read_token or "").encode(),
                       hashlib.sha256).digest()
        self._serializer = URLSafeTimedSerializer(
            key, salt=SESSION_SALT, signer_kwargs={"digest_method": hashlib.sha256})
        self.max_age = max_age

    def issue(self, role: str) -> str:
        """A cookie value for a new session of `role`, with a fresh CSRF token."""
        return self._serializer.dumps({"role": role, "csrf": secrets.token_urlsafe(24)})

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie holds; None when missing, forged, damaged or expired."""
        if not cookie:
            return None
        try:
            # itsdangerous annotates max_age as int, but only compares the age with it (`>`):
            # a fractional console.session_seconds holds as set.
            data = self._serializer.loads(cookie, max_age=self.max_age)  # type: ignore[arg-type]
        except BadSignature:  # SignatureExpired is one too
            return None
        if not isinstance(data, dict) or data.get("role") not in ROLES \
                or not isinstance(data.get("csrf"), str):
            return None
        return Session(data["role"], data["csrf"])


def csrf_ok(session: Session, offered: object) -> bool:
    """Whether a form's `csrf` field is the session's token. The field is whatever the client
    sent: missing (None), or a file part of a multipart form, is refused like a wrong one."""
    return isinstance(offered, str) and hmac.compare_digest(offered.encode(),
                                                            session.csrf.encode())


class LoginLimiter:
    """Failed logins per address in a sliding window (see the module docstring). At most
    `max_addresses` addresses are tracked: beyond, new addresses share one count
    (`OTHERS`), so that an attacker changing addresses cannot grow the table (and is then
    limited all together)."""

    OTHERS = "other addresses"

    def __init__(self, max_failures: int, window: float, max_addresses: int):
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        self._failures: dict[str, collections.deque] = {}

    def _key(self, address: str, now: float) -> str:
        if address in self._failures or len(self._failures) < self.max_addresses:
            return address
        self._forget_before(now - self.window)
        return address if len(self._failures) < self.max_addresses else self.OTHERS

    def _forget_before(self, moment: float) -> None:
        for address in [a for a, times in self._failures.items()
                        if not times or times[-1] <= moment]:
            del self._failures[address]

    def retry_after(self, address: str, now: float) -> float:
        """0 when `address` may try to log in now, else the seconds until it may."""
        times = self._failures.get(self._key(address, now))
        if not times:
            return 0.0
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.max_failures:
            return 0.0
        return times[0] + self.window - now

    def failed(self, address: str, now: float) -> None:
        times = self._failures.setdefault(self._key(address, now), collections.deque())
        times.append(now)
        while len(times) > self.max_failures:
            times.popleft()
