// hsmca ui: keeps the verification banner current while a page stays open. Everything
// else works without JavaScript. The banner's text is set with textContent (never
// parsed as HTML).
"use strict";
(function () {
  var box = document.getElementById("verdict");
  if (!box || !window.fetch) { return; }
  var banner = document.getElementById("verdict-banner");
  var detail = document.getElementById("verdict-detail");
  var lastAnswer = new Date();
  function unanswered() {
    // The view's own server went away: what is shown is no longer being checked. A
    // green banner left as it was read as verified (an auditor trial); it turns amber,
    // and says since when.
    if (box.getAttribute("data-status") === "failed") { return; }  // red stays red
    box.className = "verdict verdict-unknown";
    box.setAttribute("data-status", "unknown");
    // The live region too, once: a screen reader was told nothing, and the banner still
    // read "verified" (a web view trial)
    var said = "NOT CHECKED: hsmca ui does not answer";
    if (banner.textContent.indexOf(said) !== 0) {
      detail.textContent = "not checked since " + lastAnswer.toISOString().slice(11, 19) +
        " UTC (" + banner.textContent + ")";
      banner.textContent = said;
    }
  }
  function refresh(now) {
    // The page's own query: on a cluster its ?log= picks the log the banner is about.
    // `now` (a click): checked again now, not the verdict of the last seconds.
    var query = window.location.search + (now === true ?
      (window.location.search ? "&" : "?") + "fresh=1" : "");
    fetch("/status.json" + query, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (v) {
        if (!v) { unanswered(); return; }
        lastAnswer = new Date();
        box.className = "verdict verdict-" + (v.status === "ok" || v.status === "failed" ? v.status : "unknown");
        box.setAttribute("data-status", v.status);
        if (banner.textContent !== v.banner) { banner.textContent = v.banner; }
        detail.textContent = v.detail;
      })
      .catch(unanswered);
  }
  window.setInterval(refresh, 15000);
  // Focusable, and a button, only where it does something: with JavaScript (a web view
  // trial's keyboard reached a banner that did nothing without it)
  box.setAttribute("tabindex", "0");
  box.setAttribute("role", "button");  // said as one by screen readers (a web view trial)
  box.setAttribute("title", "click, or Enter, to check again now");
  box.addEventListener("click", function () { refresh(true); });  // checks again at once
  box.addEventListener("keydown", function (e) {  // and the keyboard's Enter or Space
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); refresh(true); }
  });
})();
