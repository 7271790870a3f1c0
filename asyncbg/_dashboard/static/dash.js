// asyncbg dashboard: live sections over server-sent events, the live filter, and actions.
(function () {
  "use strict";
  var root = document.querySelector("link[rel=stylesheet]").getAttribute("href")
    .replace(/static\/dash\.css$/, "");
  var sections = document.getElementById("sections");
  var line = document.getElementById("status-line");
  var filter = document.getElementById("filter");
  var tokenInput = document.getElementById("token");
  if (tokenInput) { tokenInput.value = sessionStorage.getItem("asyncbg-token") || ""; }

  function say(text, bad) {
    if (!line) { return; }
    line.textContent = text;
    line.className = "status-line" + (bad ? " bad" : "");
  }

  function applyFilter() {
    if (!filter || !sections) { return; }
    var needle = filter.value.trim().toLowerCase();
    sections.querySelectorAll("#live tbody tr[data-key]").forEach(function (row) {
      row.hidden = needle !== "" && row.textContent.toLowerCase().indexOf(needle) < 0;
    });
  }

  if (sections && window.EventSource) {
    var source = new EventSource(root + "events");
    var shownHtml = null;
    source.addEventListener("update", function (event) {
      // The same sections again: leave the page as it is. A rewrite between a button's
      // mousedown and mouseup would send the click to the sections, not the button.
      if (event.data === shownHtml) { say("live · updated " + new Date().toLocaleTimeString()); return; }
      shownHtml = event.data;
      var tall = sections.querySelector(".scroll.tall");  // keep where the reader scrolled to
      var top = tall ? tall.scrollTop : 0;
      sections.innerHTML = event.data;
      tall = sections.querySelector(".scroll.tall");
      if (tall) { tall.scrollTop = top; }
      applyFilter();
      say("live · updated " + new Date().toLocaleTimeString());
    });
    source.onerror = function () { say("connection lost, reconnecting…", true); };
  }
  if (filter) { filter.addEventListener("input", applyFilter); }

  function token() {
    var value = tokenInput ? tokenInput.value.trim() : "";
    if (!value) {
      value = (window.prompt("The dashboard's token (ASYNCBG_DASHBOARD_TOKEN):") || "").trim();
      if (tokenInput) { tokenInput.value = value; }
    }
    sessionStorage.setItem("asyncbg-token", value);
    return value;
  }

  function act(path, payload, what) {
    return fetch(root + "actions/" + path, {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer " + token()},
      body: JSON.stringify(payload || {})
    }).then(function (response) {
      return response.json().then(function (data) {
        if (response.status === 401) { sessionStorage.removeItem("asyncbg-token"); }
        if (!response.ok) { say(what + ": refused (" + (data.error || response.status) + ")", true); return; }
        say(what + ": done");
        if (!sections) { window.location.reload(); }
      });
    }, function () { say(what + ": the dashboard did not answer", true); });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (!button) { return; }
    var action = button.getAttribute("data-action");
    if (action === "cancel") {
      var key = button.getAttribute("data-key");
      if (window.confirm("Cancel " + key + " on the server?")) {
        act("cancel", {keys: [key]}, "cancel " + key);
      }
    } else if (action === "cancel-all") {
      if (window.confirm("Cancel every live job on the server?")) {
        act("cancel", {all: true}, "cancel every live job");
      }
    } else if (action === "retry-notifications") {
      act("retry-notifications", {}, "retry failed notifications");
    }
  });
  var form = document.getElementById("token-form");
  if (form) {
    form.addEventListener("submit", function (event) { event.preventDefault(); token(); });
  }
}());
