// genmon dashboard: draws the Plotly figures a page embeds and wires the live list.
(function () {
  "use strict";

  function drawCharts(root) {
    if (!window.Plotly) { return; }
    root.querySelectorAll(".chart[data-figure]").forEach(function (div) {
      if (div.dataset.drawn) { return; }
      var figure = JSON.parse(div.dataset.figure);
      window.Plotly.newPlot(div, figure.data, figure.layout, { displaylogo: false, responsive: true });
      div.dataset.drawn = "1";
    });
  }

  // Live parts of a page (the incident list's rows, with the page's filters; an incident
  // page's status and timeline): fetched again whenever the server's event stream says an
  // incident changed. EventSource reconnects by itself.
  function followIncidents() {
    var live = document.querySelectorAll("[data-live]");
    var state = document.getElementById("live-state");
    if (!live.length || !window.EventSource) { return; }
    var source = new EventSource("/events");
    source.onopen = function () {
      if (state) { state.dataset.state = "live"; state.textContent = "Live: updates as incidents change"; }
    };
    source.onerror = function () {
      if (state) { state.dataset.state = "reconnecting"; state.textContent = "Live: reconnecting…"; }
    };
    source.addEventListener("incidents", function () {
      live.forEach(function (element) { window.htmx.trigger(element, "genmon:incidents"); });
    });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  function start() {
    drawCharts(document);
    followIncidents();
    document.body.addEventListener("htmx:afterSwap", function (event) { drawCharts(event.target); });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
