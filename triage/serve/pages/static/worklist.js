// The worklist page: live updates from the server, sorting the rows of the page, and the keyboard.
//
// Live: events name the studies that changed: only their rows are fetched, with the page's new order, and the
// other rows are kept and moved. A reconnect, a resync or the 30 s clock tick reloads the whole page of rows.
// A study that moves to the top is highlighted (CSS animation), new studies and promotions too. The counts per
// priority level come with every refresh (X-Worklist-Counts).
//
// Sorting: a click on a column heading sorts the rows of this page by it (again: the other way round); Priority
// returns to the server's priority order, which the live updates keep.
//
// Keys (also listed on the page): j / ArrowDown next row, k / ArrowUp previous, o / Enter open, c claim,
// n next study, / find an accession, ? show the list.
(function () {
  "use strict";
  const tbody = document.getElementById("rows");
  const live = document.getElementById("live");
  const table = document.getElementById("worklist");
  if (!tbody) return;

  const rowsOf = (root) => Array.from(root.querySelectorAll("tr[data-study]"));
  let order = rowsOf(tbody).map((row) => row.dataset.study); // the server's priority order
  let timer = null;
  let inFlight = false;
  let again = false;
  let refreshes = 0;
  let whole = false; // the next refresh reloads every row
  const changed = new Set(); // studies named by events since the last refresh
  const MAX_CHANGED = 40; // past this many, one whole reload is cheaper
  let selected = null; // the Study UID of the selected row
  let sortBy = null; // {index, type, descending} while a column other than Priority sorts the page

  function formatTimes(root) {
    if (window.triageTimes) window.triageTimes(root);
  }

  function setLive(state, text) {
    if (!live) return;
    live.dataset.state = state;
    live.textContent = text;
  }

  function pageQuery() {
    const params = new URLSearchParams(window.location.search);
    params.delete("notice");
    params.delete("error");
    return params;
  }

  function rowsUrl(uids) {
    const params = pageQuery();
    if (uids) params.set("changed", uids.join(" "));
    const query = params.toString();
    return "/worklist/rows" + (query ? "?" + query : "");
  }

  function hereUrl() {
    const query = pageQuery().toString();
    return window.location.pathname + (query ? "?" + query : "");
  }

  // ------------------------------------------------------------------------------------------ sorting
  function sortValue(row, index, type) {
    const cell = row.cells[index];
    if (!cell) return type === "number" ? Infinity : "";
    const raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
    if (type === "number") {
      const value = parseFloat(raw);
      return isNaN(value) ? Infinity : value;
    }
    return raw.toLowerCase();
  }

  function applySort() {
    const rows = rowsOf(tbody);
    if (rows.length === 0) return;
    const position = new Map(order.map((uid, i) => [uid, i]));
    const priority = (row) => (position.has(row.dataset.study) ? position.get(row.dataset.study) : Infinity);
    let sorted;
    if (!sortBy) {
      sorted = rows.slice().sort((a, b) => priority(a) - priority(b));
    } else {
      const { index, type, descending } = sortBy;
      sorted = rows.slice().sort((a, b) => {
        const x = sortValue(a, index, type);
        const y = sortValue(b, index, type);
        let result = 0;
        if (x < y) result = -1;
        else if (x > y) result = 1;
        if (descending) result = -result;
        return result || priority(a) - priority(b);
      });
    }
    tbody.replaceChildren(...sorted);
  }

  function markHeadings() {
    if (!table) return;
    Array.from(table.tHead.rows[0].cells).forEach((th, index) => {
      th.classList.remove("sorted-asc", "sorted-desc");
      th.removeAttribute("aria-sort");
      if (sortBy && sortBy.index === index) {
        th.classList.add(sortBy.descending ? "sorted-desc" : "sorted-asc");
        th.setAttribute("aria-sort", sortBy.descending ? "descending" : "ascending");
      } else if (!sortBy && th.dataset.sortType === "priority") {
        th.classList.add("sorted-desc");
        th.setAttribute("aria-sort", "descending");
      }
    });
  }

  if (table && table.tHead) {
    Array.from(table.tHead.rows[0].cells).forEach((th, index) => {
      const button = th.querySelector("button.sort");
      if (!button) return;
      button.addEventListener("click", () => {
        const type = th.dataset.sortType || "text";
        if (type === "priority") sortBy = null;
        else if (sortBy && sortBy.index === index) sortBy = { index, type, descending: !sortBy.descending };
        else sortBy = { index, type, descending: false };
        applySort();
        markHeadings();
      });
    });
    markHeadings();
  }

  // ------------------------------------------------------------------------------------------ selection
  function rowOf(uid) {
    return uid ? rowsOf(tbody).find((row) => row.dataset.study === uid) || null : null;
  }

  function select(row) {
    rowsOf(tbody).forEach((r) => { r.classList.remove("selected"); r.removeAttribute("aria-selected"); });
    selected = row ? row.dataset.study : null;
    if (!row) return;
    row.classList.add("selected");
    row.setAttribute("aria-selected", "true");
    row.scrollIntoView({ block: "nearest" });
  }

  function move(step) {
    const rows = rowsOf(tbody);
    if (rows.length === 0) return;
    const current = rows.findIndex((row) => row.dataset.study === selected);
    let next = current === -1 ? (step > 0 ? 0 : rows.length - 1) : current + step;
    next = Math.max(0, Math.min(rows.length - 1, next));
    select(rows[next]);
  }

  function openSelected() {
    const row = rowOf(selected);
    if (row && row.dataset.href) window.location.href = row.dataset.href;
  }

  function postForm(action, fields) {
    const form = document.createElement("form");
    form.method = "post";
    form.action = action;
    const token = document.querySelector('meta[name="csrf-token"]');
    const all = Object.assign({ csrf_token: token ? token.content : "" }, fields);
    for (const [name, value] of Object.entries(all)) {
      const input = document.createElement("input");
      input.type = "hidden";
      input.name = name;
      input.value = value;
      form.appendChild(input);
    }
    document.body.appendChild(form);
    form.submit();
  }

  function claimSelected() {
    const row = rowOf(selected);
    if (!row) return;
    postForm("/studies/" + encodeURIComponent(row.dataset.study) + "/claim", { next: hereUrl() });
  }

  function nextStudy() {
    const form = document.getElementById("next-study-form");
    if (form) form.submit();
  }

  function toggleKeys(show) {
    const help = document.getElementById("keys-help");
    if (!help) return;
    help.hidden = show === undefined ? !help.hidden : !show;
  }

  // Keep what the reader did to the rows (selection, an opened "detail") across a reload of the rows.
  function keepState(apply) {
    const open = new Set(rowsOf(tbody).filter((row) => {
      const details = row.querySelector("details.why");
      return details && details.open;
    }).map((row) => row.dataset.study));
    apply();
    rowsOf(tbody).forEach((row) => {
      const details = row.querySelector("details.why");
      if (details && open.has(row.dataset.study)) details.open = true;
    });
    const row = rowOf(selected);
    if (row) { row.classList.add("selected"); row.setAttribute("aria-selected", "true"); }
    formatTimes(tbody);
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    const typing = target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
    if (typing) {
      if (event.key === "Escape") target.blur();
      return;
    }
    // Enter on a link or button keeps its own meaning.
    if (event.key === "Enter" && target && /^(A|BUTTON|SUMMARY)$/.test(target.tagName)) return;
    let handled = true;
    switch (event.key) {
      case "j": case "ArrowDown": move(1); break;
      case "k": case "ArrowUp": move(-1); break;
      case "o": case "Enter": openSelected(); break;
      case "c": claimSelected(); break;
      case "n": nextStudy(); break;
      case "/": {
        const box = document.getElementById("accession");
        if (box) { box.focus(); box.select(); }
        break;
      }
      case "?": toggleKeys(); break;
      case "Escape": toggleKeys(false); break;
      default: handled = false;
    }
    if (handled) event.preventDefault();
  });

  tbody.addEventListener("click", (event) => {
    const row = event.target.closest && event.target.closest("tr[data-study]");
    if (row && !event.target.closest("a, button, summary, details")) select(row);
  });

  // ------------------------------------------------------------------------------------------ live updates
  function highlight(before) {
    const rows = rowsOf(tbody);
    rows.forEach((row, index) => {
      const was = before.indexOf(row.dataset.study);
      const now = order.indexOf(row.dataset.study);
      if (now === 0 && index === 0 && was !== 0 && before.length > 0) {
        row.classList.add("jumped-top");
      } else if (was === -1) {
        row.classList.add("arrived");
      } else if (now < was) {
        row.classList.add("moved-up");
      }
    });
  }

  function updateCounts(header) {
    if (!header) return;
    for (const pair of header.split(" ")) {
      const [level, n] = pair.split("=");
      const el = document.querySelector(`#counts .count[data-level="${level}"] .n`);
      if (el && n !== undefined) el.textContent = n;
    }
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
    keepState(() => tbody.replaceChildren(...rows));
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
          const newOrder = header.split(" ").filter(Boolean);
          done = applyChanges(await response.text(), newOrder);
          if (done) order = newOrder;
          updateCounts(response.headers.get("X-Worklist-Counts"));
        }
      }
      if (!done) {
        const response = await fetchRows(null);
        if (!response) return;
        const html = await response.text();
        keepState(() => { tbody.innerHTML = html; });
        order = rowsOf(tbody).map((row) => row.dataset.study);
        updateCounts(response.headers.get("X-Worklist-Counts"));
      }
      if (sortBy) applySort();
      else highlight(before);
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
