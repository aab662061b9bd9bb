// The status page's live refresh: fetches /status.json every 2 s and
// rewrites the throughput and streams tables (the page is complete
// without it). Formats match src/status/page.rs. Text only (textContent),
// never markup: trainer ids come from clients.
"use strict";
(function () {
  var token = new URLSearchParams(location.search).get("token");
  var url = "/status.json" + (token ? "?token=" + encodeURIComponent(token) : "");
  function $(id) { return document.getElementById(id); }
  function bytes(b) {
    var u = ["B", "kB", "MB", "GB", "TB"], i = 0;
    while (b >= 1000 && i < u.length - 1) { b /= 1000; i++; }
    return (i === 0 ? b.toFixed(0) : b.toFixed(b < 10 ? 2 : 1)) + " " + u[i];
  }
  function rate(v) { return v.toFixed(v < 10 ? 2 : 1); }
  function age(s) {
    if (s < 60) return s.toFixed(1) + "s";
    var m = Math.floor(s / 60), h = Math.floor(m / 60);
    var ss = String(Math.floor(s % 60)).padStart(2, "0");
    return h > 0 ? h + "h" + String(m % 60).padStart(2, "0") + "m" + ss + "s" : m + "m" + ss + "s";
  }
  function order(t) {
    var o = t.shuffle ? "shuffled, seed " + t.seed + ", epoch " + t.epoch : "in order";
    return t.offset > 0 ? o + ", offset " + t.offset : o;
  }
  function position(t) {
    if (t.method === "Attach") return "attached";
    var p = t.sent + "/" + (t.end - t.start);
    return t.start > 0 ? p + " from " + t.start : p;
  }
  function row(t) {
    var tr = document.createElement("tr");
    var cells = [t.id, t.method, t.dataset, t.set || "(all)", t.method === "Attach" ? "" : order(t),
      t.method === "Attach" ? "" : t.rank + "/" + t.world_size, position(t),
      t.method === "Attach" ? "" : rate(t.minibatches_per_s), bytes(t.bytes),
      t.pid ? t.peer + " pid " + t.pid : t.peer, t.trainer, age(t.seconds)];
    cells.forEach(function (c, i) {
      var td = document.createElement("td");
      td.textContent = String(c);
      if (i === 0 || i === 7 || i === 8) td.className = "num";
      tr.appendChild(td);
    });
    return tr;
  }
  function tick() {
    var opts = { cache: "no-store" };
    fetch(url, opts).then(function (r) {
      if (!r.ok) return r.text().then(function (t) { throw new Error(r.status + ": " + t); });
      return r.json();
    }).then(function (s) {
      var t = s.throughput;
      $("uptime").textContent = age(s.uptime_s);
      $("bps").textContent = bytes(t.bytes_per_s) + "/s";
      $("mbps").textContent = rate(t.minibatches_per_s);
      $("bytes").textContent = bytes(t.bytes_total);
      $("minibatches").textContent = String(t.minibatches_total);
      $("active").textContent = String(t.active_streams);
      $("attached").textContent = String(t.attached);
      var body = $("streams-body");
      while (body.firstChild) body.removeChild(body.firstChild);
      s.streams.forEach(function (x) { body.appendChild(row(x)); });
      if (s.streams.length === 0) {
        var tr = document.createElement("tr"), td = document.createElement("td");
        td.colSpan = 12; td.className = "muted"; td.textContent = "no open streams";
        tr.appendChild(td); body.appendChild(tr);
      }
      $("unlisted").textContent = s.streams_unlisted > 0
        ? s.streams_unlisted + " more open streams not listed (the list holds " + s.limits.max_listed_streams + ")" : "";
      $("live").textContent = "live: updated " + new Date().toLocaleTimeString();
    }).catch(function (e) {
      $("live").textContent = "refresh failed: " + e.message;
    });
  }
  tick();
  setInterval(tick, 2000);
})();
