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

  // The incident list: refetch its rows (with the page's filters) whenever the server's
  // event stream says an incident changed. EventSource reconnects by itself.
  function followIncidents() {
    var rows = document.getElementById("incident-rows");
    var state = document.getElementById("live-state");
    if (!rows || !window.EventSource) { return; }
    var source = new EventSource("/events");
    source.onopen = function () {
      if (state) { state.dataset.state = "live"; state.textContent = "Live: updates as incidents change"; }
    };
    source.onerror = function () {
      if (state) { state.dataset.state = "reconnecting"; state.textContent = "Live: reconnecting…"; }
    };
    source.addEventListener("incidents", function () {
      window.htmx.trigger(rows, "genmon:incidents");
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
