// Live worklist: listen to the server's change events and re-render the table body from the server.
// A study that moves to the top is highlighted (CSS animation), new studies and promotions too.
(function () {
  "use strict";
  const tbody = document.getElementById("rows");
  const live = document.getElementById("live");
  if (!tbody) return;

  const rowsOf = () => Array.from(tbody.querySelectorAll("tr[data-study]"));
  let order = rowsOf().map((row) => row.dataset.study);
  let timer = null;
  let inFlight = false;
  let again = false;
  let refreshes = 0;

  function setLive(state, text) {
    if (!live) return;
    live.dataset.state = state;
    live.textContent = text;
  }

  async function refresh() {
    if (inFlight) { again = true; return; }
    inFlight = true;
    try {
      const response = await fetch("/worklist/rows" + window.location.search, {
        credentials: "same-origin",
        headers: { "Accept": "text/html" },
      });
      if (response.redirected || response.status === 401) {
        // The session ended: go to the sign-in page and come back here afterwards.
        window.location.href = "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
        return;
      }
      const html = await response.text();
      const before = order;
      tbody.innerHTML = html;
      const rows = rowsOf();
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
      refreshes += 1;
      document.body.dataset.refreshes = String(refreshes);
    } catch (err) {
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

  if (window.EventSource) {
    const source = new EventSource("/api/v1/events");
    source.onopen = () => setLive("live", "live");
    source.onerror = () => setLive("reconnecting", "reconnecting…");
    source.addEventListener("study.updated", schedule);
    source.addEventListener("resync", schedule);
    source.onmessage = schedule;
  } else {
    setLive("polling", "polling");
  }
  // Waiting times and turnaround targets move with the clock even without events.
  setInterval(schedule, 30000);
})();
