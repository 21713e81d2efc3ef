"""The web console: server-rendered pages on the admin API's endpoint, under /console.

    /console/login         the API token (admin) or the read-only token (read) for a session
    /console/lookup        IMEI (+ IMSI) → verdict, reason, source, device, observations
    /console/rules         the local rules (console.local_list): search; add, edit, delete
                           (with a store: published into it, eir.lists.sync.publish_local)
    /console/lists         versions in force and kept, provenance; rollback, unpin, sync now
    /console/peers         connected MMEs (each connection's answers by verdict: eir.diameter.
                           peer's PeerConnection.answered), AMFs, live traffic (in place)

Pages are Jinja2 templates with autoescaping on for every template (a reason or an IMEI is
text, never markup), one CSS file and a few lines of JavaScript for the live view (served
from here: no CDN, no build step; the pages work without it, the live view then needs a
reload). The Content-Security-Policy allows scripts and styles from this origin only.

The console works on the server's own objects, through what the API uses: the rule set in
force (`server.rule_set`), `server.reload_lists()` (POST /v1/lists/reload),
eir.interfaces.api.rollback_lists (POST /v1/lists/rollback), eir.interfaces.api.connected_peers
(GET /v1/peers), `server.sync_now()` (the periodic sync), eir.interfaces.metrics.merged_snapshot
(/metrics), the observations database: all of it through eir.interfaces.ports.ServerView.
IMSIs are shown masked (eir.core.logs.mask_imsi; reasons through eir.core.logs.redact) unless
logging.show_imsi.

Access (eir.interfaces.console.access): a signed session cookie (HttpOnly, SameSite=Strict,
Secure when the request came over TLS), a CSRF token in every form that changes something, the
read-only role refused every change with 403, login failures limited per address. Every change
and every login is one JSON line in the console journal (`console.journal`): time, act, role,
address, before and after; rollbacks and unpins are in the store's journal too.
"""

from eir.interfaces.console.app import console_app

__all__ = ["console_app"]
