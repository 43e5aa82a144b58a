// hexiao headquarters: refetch the server-rendered live part every few seconds (no reload).
// The HTML comes from fleetd's own templates, escaped there; a lost session goes to /login.
"use strict";
(function () {
  var conn = document.getElementById("conn");
  var live = document.getElementById("live");
  if (!conn || !live) { return; }
  var url = live.getAttribute("data-fragment");
  var every = Math.max(1, parseFloat(conn.getAttribute("data-refresh")) || 5) * 1000;
  var lostSince = null;

  function refresh() {
    fetch(url, { cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401) { window.location.assign("/login"); throw new Error("session"); }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        live.innerHTML = html;
        lostSince = null;
        conn.textContent = "live";
        conn.className = "conn";
      })
      .catch(function () {
        // fleetd's page or its database unreachable: say so, keep the last figures, keep trying
        if (lostSince === null) { lostSince = new Date().toTimeString().slice(0, 8); }
        conn.textContent = "not answering since " + lostSince;
        conn.className = "conn lost";
      })
      .finally(function () { setTimeout(refresh, every); });
  }
  setTimeout(refresh, every);
})();
