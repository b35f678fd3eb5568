// flowgate console: small progressive enhancements. Every page works without it; with it,
// windows count down, moving parts update from server-sent events, the reply box shows
// the policy's decision as you type, and the campaign form previews its audience and runs.
(function () {
  "use strict";

  function span(seconds) {
    var s = Math.max(0, Math.floor(seconds));
    var d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    var m = Math.floor((s % 3600) / 60), r = s % 60;
    if (d > 0) return d + "d " + h + "h";
    if (h > 0) return h + "h " + m + "m " + r + "s";
    if (m > 0) return m + "m " + r + "s";
    return r + "s";
  }

  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-closes]").forEach(function (el) {
      var left = (Date.parse(el.getAttribute("data-closes")) - now) / 1000;
      if (isNaN(left)) return;
      if (left > 0) {
        el.textContent = "open · closes in " + span(left);
      } else {
        el.textContent = "closed";
        el.className = "window closed";
        el.removeAttribute("data-closes");
      }
    });
  }

  function live() {
    if (!window.EventSource) return;
    document.querySelectorAll("[data-live]").forEach(function (el) {
      var source = new EventSource(el.getAttribute("data-live"));
      source.addEventListener("update", function (e) {
        el.innerHTML = e.data;
        el.setAttribute("data-updated", String(Date.now()));
        tick();
      });
    });
  }

  function debounce(fn, ms) {
    var t;
    return function () {
      clearTimeout(t);
      t = setTimeout(fn, ms);
    };
  }

  function fetchInto(url, target) {
    fetch(url, { credentials: "same-origin" })
      .then(function (r) { return r.text(); })
      .then(function (html) { target.innerHTML = html; })
      .catch(function () {});
  }

  function replyPreview() {
    document.querySelectorAll("form[data-preview]").forEach(function (form) {
      var box = form.querySelector("textarea");
      var out = form.querySelector("#preview");
      var update = debounce(function () {
        if (!box.value.trim()) return;
        var url = form.getAttribute("data-preview");
        url += (url.indexOf("?") < 0 ? "?" : "&") + "text=" + encodeURIComponent(box.value);
        fetchInto(url, out);
      }, 300);
      box.addEventListener("input", update);
    });
  }

  function campaignForm() {
    var form = document.querySelector("form[data-campaign-form]");
    if (!form) return;
    var select = form.querySelector("#c-template");
    var body = form.querySelector("#c-template-body");
    var preview = form.querySelector("#campaign-preview");
    function params() {
      var option = select.options[select.selectedIndex];
      var n = option ? parseInt(option.getAttribute("data-params") || "0", 10) : 0;
      body.textContent = option && option.getAttribute("data-body") ? option.getAttribute("data-body") : "";
      form.querySelectorAll("[data-param]").forEach(function (p) {
        p.hidden = parseInt(p.getAttribute("data-param"), 10) > n;
      });
    }
    var refresh = debounce(function () {
      var data = new URLSearchParams(new FormData(form));
      data.delete("csrf");
      fetchInto("/campaigns/preview?" + data.toString(), preview);
    }, 300);
    select.addEventListener("change", function () { params(); refresh(); });
    form.addEventListener("input", refresh);
    form.addEventListener("change", refresh);
    params();
    refresh();
  }

  function csvFile() {
    document.querySelectorAll("[data-csv-file]").forEach(function (input) {
      input.addEventListener("change", function () {
        var file = input.files && input.files[0];
        if (!file) return;
        file.text().then(function (text) {
          input.form.querySelector("textarea[name=csv]").value = text;
        });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    tick();
    setInterval(tick, 1000);
    live();
    replyPreview();
    campaignForm();
    csvFile();
  });
})();
