"""hexiao-fleetd's status page for headquarters: stores online and offline, redemptions per hour,
open alarms, rollouts in progress, and each store's lanes with their firmware, behind a login.

`hexiao-fleetd web` serves it (server.py: waitress, loopback by default, TLS in a proxy in
front); `app.py` is the WSGI application (Jinja2 templates in templates/, CSS and JS in static/,
hostd's page.css shared, nothing from a CDN); `view.py` reads fleetd's PostgreSQL into what the
pages show; `chart.py` draws redemptions per hour (pygal SVG); `auth.py` keeps operators,
sessions and the failed-login backoff. The page only reads the fleet; each module's header
states its rules.
"""
