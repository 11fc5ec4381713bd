// hsmca ui: keeps the verification banner current while a page stays open. Everything
// else works without JavaScript. The banner's text is set with textContent (never
// parsed as HTML).
"use strict";
(function () {
  var box = document.getElementById("verdict");
  if (!box || !window.fetch) { return; }
  var banner = document.getElementById("verdict-banner");
  var detail = document.getElementById("verdict-detail");
  function refresh() {
    // The page's own query: on a cluster its ?log= picks the log the banner is about.
    fetch("/status.json" + window.location.search, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (v) {
        if (!v) { return; }
        box.className = "verdict verdict-" + (v.status === "ok" || v.status === "failed" ? v.status : "unknown");
        box.setAttribute("data-status", v.status);
        banner.textContent = v.banner;
        detail.textContent = v.detail;
      })
      .catch(function () { /* the UI server went away: keep what is shown */ });
  }
  window.setInterval(refresh, 15000);
})();
