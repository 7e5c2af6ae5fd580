/* twisted_mailout status page: polls api/v1/status every 5 s and redraws.
 *
 * Every value from the API is put in the page with textContent, never as
 * markup: replies come from remote servers and recipients from senders.
 * The API token (when the API answers 401) is kept in sessionStorage, for
 * this tab only, and sent as "Authorization: Bearer TOKEN".
 *
 * window.mailoutStatus exposes the state for tests and for curious
 * operators: {data, renders, charts: {depth, outcomes}, errors, lastError}.
 */
(function () {
  "use strict";

  var API = "api/v1/status";
  var POLL_MS = 5000;
  var TOKEN_KEY = "mailout.token";
  var CHART_HEIGHT = 240;
  var QUEUE_NAMES = ["incoming", "active", "deferred", "hold"];
  var STATUSES = ["delivered", "deferred", "bounced"];
  var COLORS = {
    total: "#1c7ed6", incoming: "#868e96", active: "#15aabf", deferred: "#d9822b",
    hold: "#7048e8", delivered: "#2b8a3e", bounced: "#c92a2a"
  };

  // y axis steps: whole numbers only (counts of messages and recipients)
  var COUNT_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 1e4, 2e4,
                          5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7];

  var state = {data: null, renders: 0, charts: {depth: null, outcomes: null},
               errors: 0, lastError: null, polls: 0};
  window.mailoutStatus = state;
  var timer = null;

  function $(id) { return document.getElementById(id); }

  // -- formatting (the test of the page formats the same way) ---------------

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function fmtTime(t) {
    if (t === null || t === undefined) { return "—"; }
    return new Date(t * 1000).toISOString().slice(0, 19).replace("T", " ");
  }

  function fmtDuration(s) {
    if (s === null || s === undefined) { return "—"; }
    s = Math.floor(s);
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
    var m = Math.floor(s % 3600 / 60), sec = s % 60;
    if (d) { return d + "d " + h + "h " + m + "m"; }
    if (h) { return h + "h " + m + "m"; }
    if (m) { return m + "m " + pad(sec) + "s"; }
    return sec + "s";
  }

  function fmtClock(t) {  // the time axis: HH:MM, UTC
    return t === null ? "" : new Date(t * 1000).toISOString().slice(11, 16);
  }

  function fmtCount(n) { return Number(n).toLocaleString("en-US"); }

  function fmtValue(v) {
    if (v === null || v === undefined) { return "—"; }
    if (Array.isArray(v)) { return v.length ? v.map(fmtValue).join(", ") : "—"; }
    if (typeof v === "boolean") { return v ? "yes" : "no"; }
    return String(v);
  }

  function setText(id, text) { $(id).textContent = text; }

  // -- tables ----------------------------------------------------------------

  function fillTable(id, rows, cells) {
    var body = $(id).tBodies[0];
    var columns = $(id).tHead.rows[0].cells.length;
    var frag = document.createDocumentFragment();
    if (!rows.length) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      td.colSpan = columns;
      td.className = "empty";
      td.textContent = "none";
      tr.appendChild(td);
      frag.appendChild(tr);
    }
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      cells(row).forEach(function (cell) {
        var td = document.createElement("td");
        td.textContent = cell[0];
        if (cell[1]) { td.className = cell[1]; }
        tr.appendChild(td);
      });
      frag.appendChild(tr);
    });
    body.replaceChildren(frag);
  }

  // -- charts ----------------------------------------------------------------

  function depthData(d) {
    var depth = d.depth;
    return [depth.time, depth.total].concat(QUEUE_NAMES.map(function (n) {
      return depth[n] || depth.time.map(function () { return 0; });
    }));
  }

  function outcomeData(d) {
    var o = d.outcomes;
    return [o.time].concat(STATUSES.map(function (s) { return o[s]; }));
  }

  function chartWidth(el) { return Math.max(300, el.clientWidth || 600); }

  function makeChart(el, names, data, stepped) {
    var series = [{}].concat(names.map(function (name) {
      var s = {label: name, stroke: COLORS[name], width: name === "total" ? 2.5 : 1.5,
               points: {show: false}};
      if (stepped && uPlot.paths && uPlot.paths.stepped) {
        s.paths = uPlot.paths.stepped({align: 1});
      }
      return s;
    }));
    var opts = {
      width: chartWidth(el),
      height: CHART_HEIGHT,
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); },
      scales: {
        x: {time: true},
        y: {range: function (u, min, max) { return [0, max > 0 ? Math.ceil(max * 1.1) : 1]; }}
      },
      series: series,
      axes: [
        {values: function (u, splits) { return splits.map(fmtClock); }},
        {incrs: COUNT_INCREMENTS}
      ],
      cursor: {drag: {x: false, y: false}}
    };
    return new uPlot(opts, data, el);
  }

  function drawCharts(d) {
    if (typeof uPlot === "undefined") { throw new Error("the chart library did not load"); }
    var c = state.charts;
    if (!c.depth) {
      c.depth = makeChart($("chart-depth"), ["total"].concat(QUEUE_NAMES), depthData(d), false);
      c.outcomes = makeChart($("chart-outcomes"), STATUSES, outcomeData(d), true);
    } else {
      c.depth.setData(depthData(d));
      c.outcomes.setData(outcomeData(d));
    }
  }

  function resizeCharts() {
    [["depth", "chart-depth"], ["outcomes", "chart-outcomes"]].forEach(function (p) {
      var chart = state.charts[p[0]];
      if (chart) { chart.setSize({width: chartWidth($(p[1])), height: CHART_HEIGHT}); }
    });
  }

  // -- rendering -------------------------------------------------------------

  function render(d) {
    setText("version", d.version);
    setText("uptime", fmtDuration(d.uptime));
    setText("updated", fmtTime(d.now));
    ["total"].concat(QUEUE_NAMES).forEach(function (n) {
      setText("queue-" + n, fmtCount(d.queue[n]));
    });
    STATUSES.forEach(function (s) { setText("total-" + s, fmtCount(d.totals[s])); });
    drawCharts(d);
    fillTable("destinations", d.destinations, function (r) {
      return [[r.destination], [fmtCount(r.deferred), "num"], [r.last_reply || "—"],
              [fmtTime(r.last_time), "time"], [fmtTime(r.last_delivered), "time"]];
    });
    fillTable("bounces", d.bounces, function (r) {
      return [[fmtTime(r.time), "time"], [r.queue_id || "—"], [r.recipient],
              [r.reply || "—"], [r.outcome]];
    });
    fillTable("suspensions", d.suspensions, function (r) {
      return [[r.id], [r.domain], [r.reason || "—"], [fmtTime(r.created), "time"],
              [fmtTime(r.until), "time"]];
    });
    fillTable("shared", d.shared_queue ? [d.shared_queue] : [], function (r) {
      return [[fmtCount(r.incoming), "num"], [fmtCount(r.claimed), "num"],
              [fmtCount(r.hold), "num"], [fmtCount(r.owners), "num"]];
    });
    fillTable("throttles", d.throttles || [], function (r) {
      return [[r.key], [r.kind === "rate" ? "rate " + r.rate : "suspended"], [r.rule],
              [r.reason || "—"], [fmtTime(r.until), "time"]];
    });
    fillTable("settings", Object.keys(d.settings).map(function (k) {
      return [k, d.settings[k]];
    }), function (r) { return [[r[0]], [fmtValue(r[1])]]; });
    state.data = d;
    state.renders += 1;
    document.body.dataset.renderedNow = String(d.now);
  }

  // -- polling ---------------------------------------------------------------

  function showState(text, isError) {
    var el = $("state");
    el.textContent = text;
    el.className = isError ? "state error" : "state";
  }

  function askToken(why) {
    setText("token-why", why);
    $("token-form").hidden = false;
    $("token").focus();
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  function failed(message) {
    state.errors += 1;
    state.lastError = message;
    showState(message, true);
  }

  function errorMessage(response) {
    return response.json().then(function (body) {
      return (body && body.error && body.error.message) || response.statusText;
    }, function () { return response.statusText; });
  }

  function poll() {
    clearTimeout(timer);
    state.polls += 1;
    var headers = {"Accept": "application/json"};
    var token = sessionStorage.getItem(TOKEN_KEY);
    if (token) { headers.Authorization = "Bearer " + token; }
    fetch(API, {headers: headers, cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        if (response.status === 401 || response.status === 403) {
          sessionStorage.removeItem(TOKEN_KEY);
          failed(response.status === 401 ? "the API needs a token" : "the token was refused");
          askToken(response.status === 401 ? "(the API needs one)" : "(that one was refused)");
          return null;  // no more polling until a token is given
        }
        if (!response.ok) {
          return errorMessage(response).then(function (message) {
            failed("the daemon answered " + response.status + ": " + message);
            schedule();
          });
        }
        return response.json().then(function (data) {
          $("token-form").hidden = true;
          render(data);
          showState("live, every " + POLL_MS / 1000 + " s", false);
          schedule();
        });
      })
      .catch(function (e) {
        failed("cannot reach the daemon: " + (e && e.message ? e.message : e));
        schedule();
      });
  }

  function start() {
    $("token-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var value = $("token").value.trim();
      if (!value) { return; }
      sessionStorage.setItem(TOKEN_KEY, value);
      $("token").value = "";
      $("token-form").hidden = true;
      showState("loading…", false);
      poll();
    });
    var pending = null;
    window.addEventListener("resize", function () {
      clearTimeout(pending);
      pending = setTimeout(resizeCharts, 100);
    });
    poll();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
