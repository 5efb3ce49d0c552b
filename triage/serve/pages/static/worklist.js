// Live worklist: listen to the server's change events and update the table from the server.
// Events name the studies that changed: only their rows are fetched, with the page's new order, and the other
// rows are kept and moved. A reconnect, a resync or the 30 s clock tick reloads the whole page of rows.
// A study that moves to the top is highlighted (CSS animation), new studies and promotions too.
(function () {
  "use strict";
  const tbody = document.getElementById("rows");
  const live = document.getElementById("live");
  if (!tbody) return;

  const rowsOf = (root) => Array.from(root.querySelectorAll("tr[data-study]"));
  let order = rowsOf(tbody).map((row) => row.dataset.study);
  let timer = null;
  let inFlight = false;
  let again = false;
  let refreshes = 0;
  let whole = false; // the next refresh reloads every row
  const changed = new Set(); // studies named by events since the last refresh
  const MAX_CHANGED = 40; // past this many, one whole reload is cheaper

  function setLive(state, text) {
    if (!live) return;
    live.dataset.state = state;
    live.textContent = text;
  }

  function rowsUrl(uids) {
    const params = new URLSearchParams(window.location.search);
    if (uids) params.set("changed", uids.join(" "));
    const query = params.toString();
    return "/worklist/rows" + (query ? "?" + query : "");
  }

  function highlight(before) {
    const rows = rowsOf(tbody);
    order = rows.map((row) => row.dataset.study);
    rows.forEach((row, index) => {
      const was = before.indexOf(row.dataset.study);
      if (index === 0 && was !== 0 && before.length > 0) {
        row.classList.add("jumped-top");
      } else if (was === -1) {
        row.classList.add("arrived");
      } else if (index < was) {
        row.classList.add("moved-up");
      }
    });
  }

  // Put the fetched rows in and the kept ones in the new order; false when a row of the new order is missing
  // (a study that slid onto this page without changing): then the whole page is reloaded.
  function applyChanges(html, newOrder) {
    const holder = document.createElement("tbody");
    holder.innerHTML = html;
    const fresh = new Map(rowsOf(holder).map((row) => [row.dataset.study, row]));
    const kept = new Map(rowsOf(tbody).map((row) => [row.dataset.study, row]));
    const rows = [];
    for (const uid of newOrder) {
      const row = fresh.get(uid) || kept.get(uid);
      if (!row) return false;
      if (fresh.has(uid)) row.classList.remove("jumped-top", "arrived", "moved-up");
      rows.push(row);
    }
    if (rows.length === 0) return false; // "No studies match." comes with a whole reload
    tbody.replaceChildren(...rows);
    return true;
  }

  async function fetchRows(uids) {
    const response = await fetch(rowsUrl(uids), { credentials: "same-origin", headers: { "Accept": "text/html" } });
    if (response.redirected || response.status === 401) {
      // The session ended: go to the sign-in page and come back here afterwards.
      window.location.href = "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
      return null;
    }
    return response;
  }

  async function refresh() {
    if (inFlight) { again = true; return; }
    inFlight = true;
    const uids = whole || changed.size > MAX_CHANGED ? null : Array.from(changed);
    whole = false;
    changed.clear();
    try {
      const before = order;
      let done = false;
      if (uids && uids.length) {
        const response = await fetchRows(uids);
        if (!response) return;
        const header = response.headers.get("X-Worklist-Order");
        if (response.ok && header !== null) {
          done = applyChanges(await response.text(), header.split(" ").filter(Boolean));
        }
      }
      if (!done) {
        const response = await fetchRows(null);
        if (!response) return;
        tbody.innerHTML = await response.text();
      }
      highlight(before);
      refreshes += 1;
      document.body.dataset.refreshes = String(refreshes);
    } catch (err) {
      whole = true;
      setLive("error", "update failed; retrying");
    } finally {
      inFlight = false;
      if (again) { again = false; schedule(); }
    }
  }

  // A CT study arrives as hundreds of instances: coalesce bursts of events into one refresh.
  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, 300);
  }

  function onChange(event) {
    try {
      const data = JSON.parse(event.data || "{}");
      if (data.study_uid) changed.add(data.study_uid);
      else whole = true;
    } catch (err) {
      whole = true;
    }
    schedule();
  }

  function reloadAll() {
    whole = true;
    schedule();
  }

  if (window.EventSource) {
    const source = new EventSource("/api/v1/events");
    source.onopen = () => { setLive("live", "live"); reloadAll(); }; // events may have been missed meanwhile
    source.onerror = () => setLive("reconnecting", "reconnecting…");
    source.addEventListener("study.updated", onChange);
    source.addEventListener("resync", reloadAll);
    source.onmessage = reloadAll;
  } else {
    setLive("polling", "polling");
  }
  // Waiting times and turnaround targets move with the clock even without events.
  setInterval(reloadAll, 30000);
})();
