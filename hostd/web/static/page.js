// hexiao status page: refetch the server-rendered live part every few seconds (no reload).
// The HTML comes from hostd's own templates, escaped there; nothing else is fetched.
"use strict";
(function () {
  var conn = document.getElementById("conn");
  var live = document.getElementById("live");
  var every = Math.max(1, parseFloat(conn.getAttribute("data-refresh")) || 2) * 1000;
  var lostSince = null;

  function stamp() {
    return new Date().toTimeString().slice(0, 8);
  }

  function refresh() {
    fetch("/fragment", { cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
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
        // hostd stopped or unreachable: say so, keep the last figures, keep trying
        if (lostSince === null) { lostSince = stamp(); }
        conn.textContent = "hostd not answering since " + lostSince;
        conn.className = "conn lost";
      })
      .finally(function () { setTimeout(refresh, every); });
  }
  setTimeout(refresh, every);
})();
