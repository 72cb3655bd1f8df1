// sparecycles dashboard: draw the page's figures with plotly, then poll its JSON endpoint and
// redraw in place (no full reload). The first data comes inside the page, so charts show at once.
(function () {
  "use strict";
  var dataEl = document.getElementById("dashboard-data");
  var main = document.querySelector("main[data-api]");
  if (!dataEl || !main) { return; }
  // on a touch screen plotly's tool bar would sit on the figure for good: leave it out there
  var touch = window.matchMedia && window.matchMedia("(hover: none)").matches;
  var config = { responsive: true, displaylogo: false, displayModeBar: touch ? false : "hover",
                 modeBarButtonsToRemove: ["lasso2d", "select2d", "toImage"] };
  var polls = 0;

  function draw(data) {
    var charts = data.charts || {};
    Object.keys(charts).forEach(function (name) {
      var el = document.querySelector('[data-chart="' + name + '"]');
      if (el && window.Plotly) { window.Plotly.react(el, charts[name].data, charts[name].layout, config); }
    });
    var stats = data.stats || {};
    Object.keys(stats).forEach(function (name) {
      document.querySelectorAll('[data-stat="' + name + '"]').forEach(function (el) {
        el.textContent = stats[name];
      });
    });
    var updated = document.querySelector("[data-updated]");
    if (updated && data.updated) { updated.textContent = data.updated; }
  }

  function banner(text) {
    var el = document.getElementById("poll-status");
    if (el) { el.textContent = text; el.hidden = false; }
  }

  var asked = Number(new URLSearchParams(window.location.search).get("poll"));
  var seconds = asked >= 2 && asked <= 300 ? asked : Number(main.dataset.poll || 15);
  var timer = null;

  function poll() {
    if (document.hidden) { return; }
    fetch(main.dataset.api, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401 || r.status === 403) {
          banner("Your session has ended. Reload the page to sign in again.");
          window.clearInterval(timer);
          return null;
        }
        return r.ok ? r.json() : null;
      })
      .then(function (data) {
        if (!data) { return; }
        draw(data);
        var status = document.getElementById("poll-status");
        if (status) { status.hidden = true; }
        polls += 1;
        main.dataset.polls = String(polls);
      })
      .catch(function () { banner("The coordinator did not answer; retrying."); });
  }

  draw(JSON.parse(dataEl.textContent));
  main.dataset.polls = "0";
  document.body.classList.add("charts-ready");
  timer = window.setInterval(poll, seconds * 1000);
})();
