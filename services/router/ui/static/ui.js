// The header says whether the live feed is connected. Once it is open (and after every
// reconnect) each live fragment is re-fetched, so what changed while the page had no feed is
// shown without a reload. A refused action shows why in the notice area.
(function () {
  function refreshAll() {
    document.querySelectorAll("[data-live]").forEach(function (el) { htmx.trigger(el, "refresh"); });
  }
  function showLive(live) {
    var status = document.getElementById("live-status");
    if (status) { status.textContent = live ? "live" : "offline"; status.classList.toggle("on", live); }
  }
  document.addEventListener("htmx:sseOpen", function () { showLive(true); refreshAll(); });
  document.addEventListener("htmx:sseError", function () { showLive(false); });
  document.addEventListener("htmx:responseError", function (evt) {
    var xhr = evt.detail.xhr, notice = document.getElementById("notice"), text = xhr.responseText;
    try { text = JSON.parse(text).error.message; } catch (e) { /* not the API's JSON error */ }
    if (notice) { notice.textContent = text || ("Error " + xhr.status); notice.className = "error"; }
  });
  document.addEventListener("htmx:afterRequest", function (evt) {
    var notice = document.getElementById("notice");
    if (notice && evt.detail.successful && evt.detail.target === notice) { notice.className = ""; }
  });
})();
