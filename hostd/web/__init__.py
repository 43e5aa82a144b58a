"""hexiao-hostd's local status page: lanes and devices, the last verdicts, entries that need a
person, the receipt tap and printer, for a shop's IT person in a browser.

`server.py` serves it from hostd's process (waitress, `[hostd] web_listen`, loopback by default),
`app.py` is the WSGI application (Jinja2 templates in templates/, CSS and JS in static/, nothing
from a CDN), `view.py` reads the control socket's handlers into what the page shows. The page only
reads; each module's header states its rules.
"""
