// Every page: times in the reader's own time zone, confirmations, and the communication form's clock.
// The server writes each time as UTC text inside <time class="local" datetime="ISO">; this shows it on the
// browser's clock with the zone's abbreviation (and the day when it is not today).
(function () {
  "use strict";

  const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", hour12: false, timeZoneName: "short" });
  const dayClock = new Intl.DateTimeFormat(undefined, {
    weekday: "short", day: "2-digit", month: "short", hour: "2-digit", minute: "2-digit", hour12: false, timeZoneName: "short",
  });

  function sameDay(a, b) {
    return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
  }

  function formatTimes(root) {
    const now = new Date();
    (root || document).querySelectorAll("time.local[datetime]").forEach((el) => {
      const at = new Date(el.getAttribute("datetime"));
      if (isNaN(at.getTime())) return;
      el.textContent = (sameDay(at, now) ? clock : dayClock).format(at);
      el.title = at.toISOString().replace(".000Z", "Z") + " (UTC)";
      el.dataset.formatted = "local";
    });
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  // The critical-result form: "when" defaults to now on the reader's clock, in the reader's zone.
  function communicationClock() {
    const at = document.getElementById("told-at");
    const zone = document.getElementById("told-zone");
    const zoneName = document.getElementById("told-zone-name");
    if (!at || !zone) return;
    let browserZone = "";
    try { browserZone = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (err) { browserZone = ""; }
    if (!browserZone) return; // the site's zone and clock, as the server wrote them
    const now = new Date();
    at.value = `${now.getFullYear()}-${pad(now.getMonth() + 1)}-${pad(now.getDate())}T${pad(now.getHours())}:${pad(now.getMinutes())}`;
    zone.value = browserZone;
    if (zoneName) zoneName.textContent = "your clock, " + browserZone;
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });

  window.triageTimes = formatTimes;
  formatTimes(document);
  communicationClock();
})();
